"""The logits-masked LM head gives the full-logits loss and the same gradients, with TP and SP.

Also: with a megatron-DDP style fp32 `main_grad` on the output weight, its gradient is
accumulated there (no separate [V, h] gradient) and equals the ordinary one.

Cases: TP1 (as DP2), TP2, TP2 + sequence parallel (each TP rank then selects from its own
slice of the sequence; one rank's slice holds no supervised token of a row).
"""
import torch

from mv_testlib import spawn


def _grads_and_loss(model, batch, masked: bool):
    model.zero_grad(set_to_none=True)
    model.language_model.mask_logits = masked
    losses = model(batch["tokens"], batch["position_ids"], pixel_values=batch["pixel_values"], labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    loss = losses.sum() / batch["loss_mask"].sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, tuple(losses.shape)


def _rank(rank, world, hf_dir):
    from megatron_vita.checkpoint.hf_format import HFSource
    from megatron_vita.checkpoint.model_io import load_hf_weights
    from megatron_vita.config import ModelConfig, ParallelConfig
    from megatron_vita.models.long_vita.builder import build_model_chunks
    from megatron_vita.parallel.state import parallel_layout

    cfg = ModelConfig.from_hf_dir(hf_dir)
    gen = torch.Generator().manual_seed(7)
    s = 32
    tokens = torch.randint(0, cfg.tokens.bos_token_id, (2, s), generator=gen)
    tokens[1, 6:6 + cfg.num_image_token] = cfg.tokens.img_context  # one image tile in row 1
    pixel_values = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
    labels = torch.full_like(tokens, -100)
    labels[0, 20:30] = tokens[0, 21:31]  # only in the second half: TP rank 0's SP slice has none of row 0
    labels[1, 0:5] = tokens[1, 1:6]      # a supervised first position
    labels[1, 12:18] = tokens[1, 13:19]  # crosses the SP boundary at s/2, after the image
    batch = dict(tokens=tokens, labels=labels, loss_mask=(labels != -100).float(), pixel_values=pixel_values,
                 position_ids=torch.arange(s)[None].expand(2, -1))
    out = {}
    for name, layout in {"tp1": {}, "tp2": dict(tensor_model_parallel_size=2),
                         "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True)}.items():
        par = ParallelConfig(**layout)
        with parallel_layout(par):
            model = build_model_chunks(cfg, par)[0]
            load_hf_weights([model], HFSource(hf_dir), cfg, par)
            full_loss, full_grads, full_shape = _grads_and_loss(model, batch, masked=False)
            mask_loss, mask_grads, mask_shape = _grads_and_loss(model, batch, masked=True)
            assert set(full_grads) == set(mask_grads)
            grad_diff = max(((full_grads[n] - mask_grads[n]).abs().max() / full_grads[n].abs().max().clamp(min=1e-12))
                            .item() for n in full_grads)
            # Under megatron DDP the output weight's gradient is accumulated into its fp32 main_grad.
            weight = model.language_model.output_layer.weight
            weight.main_grad = torch.zeros_like(weight, dtype=torch.float32)
            weight.grad_added_to_main_grad = False
            _grads_and_loss(model, batch, masked=True)
            key = "language_model.output_layer.weight"
            main_grad_diff = (weight.main_grad - mask_grads[key]).abs().max().item() / mask_grads[key].abs().max().item()
            assert weight.grad_added_to_main_grad
            out[name] = dict(full=full_loss.item(), masked=mask_loss.item(), grad_rel=grad_diff,
                             full_shape=full_shape, mask_shape=mask_shape, n_grads=len(full_grads),
                             main_grad_rel=main_grad_diff)
    return out


def test_masked_head_equals_full_logits(tiny_hf_dir):
    for rank, res in enumerate(spawn(_rank, 2, tiny_hf_dir, timeout=300)):
        assert set(res) == {"tp1", "tp2", "tp2_sp"}
        for name, r in res.items():
            supervised = 10 + 5 + 6
            assert r["full_shape"] == (2, 32) and r["mask_shape"] == (supervised,), (name, r)
            assert abs(r["full"] - r["masked"]) <= 1e-6 * abs(r["full"]), (rank, name, r)
            assert r["grad_rel"] <= 1e-5, (rank, name, r)
            assert r["main_grad_rel"] <= 1e-5, (rank, name, r)
            assert r["n_grads"] > 50  # every parameter, ViT included, took part in backward
