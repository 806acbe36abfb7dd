"""The logits-masked LM head gives the full-logits loss and the same gradients, with TP and SP.

Also: with a megatron-DDP style fp32 `main_grad` on the output weight, its gradient is
accumulated there (no separate [V, h] gradient) and equals the ordinary one.

Against an outside reference: on a text batch the masked head's per-token losses, the
micro-batch loss (`training.engine.loss_func`, the training reduction) and every language-model
gradient equal `torch.nn.functional.cross_entropy` on transformers' own `Qwen2ForCausalLM`
logits with the same pre-shifted labels (-100 where unsupervised), same weights.

Cases: TP1 (as DP2), TP2, TP2 + sequence parallel (each TP rank then selects from its own
slice of the sequence; one rank's slice holds no supervised token of a row). One spawned
group serves both tests.
"""
import pytest
import torch
import torch.nn.functional as F

from mv_testlib import checkpoint_weights_with, qwen2_reference, spawn

LAYOUTS = {"tp1": {}, "tp2": dict(tensor_model_parallel_size=2),
           "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True)}


def _grads_and_loss(model, batch, masked: bool):
    model.zero_grad(set_to_none=True)
    model.language_model.mask_logits = masked
    losses = model(batch["tokens"], batch["position_ids"], pixel_values=batch["pixel_values"], labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    loss = losses.sum() / batch["loss_mask"].sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, tuple(losses.shape)


def _versus_full_head(hf_dir):
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
    for name, layout in LAYOUTS.items():
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


def _text_batch(cfg, s: int = 32):
    """Two text rows with pre-shifted labels: supervised first and last positions, a span across
    the SP boundary at s/2, and a row whose supervised tokens all sit in the second half."""
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, cfg.tokens.bos_token_id, (2, s), generator=gen)
    labels = torch.full_like(tokens, -100)
    labels[0, 20:31] = tokens[0, 21:32]
    labels[0, 31] = 5  # the last position's target lies past the row (the next document, say)
    labels[1, 0:5] = tokens[1, 1:6]
    labels[1, 12:18] = tokens[1, 13:19]
    return dict(tokens=tokens, labels=labels, loss_mask=(labels != -100).float(),
                position_ids=torch.arange(s)[None].expand(2, -1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def _versus_transformers(hf_dir):
    """The masked head's losses and LLM gradients against F.cross_entropy on Qwen2ForCausalLM logits."""
    from megatron.core import parallel_state as ps

    from megatron_vita.checkpoint import mapping
    from megatron_vita.checkpoint.model_io import chunk_parameters, load_hf_weights
    from megatron_vita.config import ModelConfig, ParallelConfig
    from megatron_vita.models.long_vita.builder import build_model_chunks, chunk_layers
    from megatron_vita.parallel.state import parallel_layout
    from megatron_vita.training.engine import loss_func

    cfg = ModelConfig.from_hf_dir(hf_dir)
    qwen2 = qwen2_reference(cfg)
    weights = checkpoint_weights_with(hf_dir, qwen2.state_dict())
    batch = _text_batch(cfg)
    labels, loss_mask = batch["labels"], batch["loss_mask"]
    logits = qwen2(input_ids=batch["tokens"]).logits
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    ref_tokens = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="none").view(labels.shape)
    ref_loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in qwen2.named_parameters()}
    # The masked head returns the supervised positions in [s, b] order.
    ref_tokens = ref_tokens.detach().t()[loss_mask.t() > 0]
    out = {}
    for name, layout in LAYOUTS.items():
        par = ParallelConfig(**layout)
        with parallel_layout(par):
            model = build_model_chunks(cfg, par)[0]
            load_hf_weights([model], weights, cfg, par)
            assert model.language_model.mask_logits
            losses = model(batch["tokens"], batch["position_ids"], labels=labels, loss_mask=loss_mask)
            loss, _ = loss_func(loss_mask, losses)
            loss.backward()
            tp_group = ps.get_tensor_model_parallel_group()
            grad_rel, n_grads = {}, 0
            for local, param in chunk_parameters(model).items():
                if not local.startswith("language_model."):
                    assert param.grad is None, local  # no image: the ViT and projector take no part
                    continue
                if par.sequence_parallel and getattr(param, "sequence_parallel", False):
                    # What megatron's finalize_model_grads does for norms under SP: sum the TP ranks' parts.
                    torch.distributed.all_reduce(param.grad, group=tp_group)
                p = mapping.lookup(mapping.local_to_global(local, chunk_layers(cfg, par, 0)))
                full = mapping.to_mcore(cfg, p, [ref_grads[h] for h in p.hf_names])
                padded = param.shape[0] * par.tp if p.rule.shard == "vocab" else None
                expected = mapping.shard(p, full, par.tp, ps.get_tensor_model_parallel_rank(), padded)
                grad_rel[local] = _rel(param.grad, expected)
                n_grads += 1
            out[name] = dict(loss=loss.item(), ref_loss=ref_loss.item(),
                             token_diff=(losses.detach() - ref_tokens).abs().max().item(),
                             n_tokens=(losses.numel(), ref_tokens.numel()), grad_rel=grad_rel, n_grads=n_grads)
    return out


def _rank(rank, world, hf_dir):
    return {"full_head": _versus_full_head(hf_dir), "transformers": _versus_transformers(hf_dir)}


@pytest.fixture(scope="module")
def results(tiny_hf_dir):
    return spawn(_rank, 2, tiny_hf_dir, timeout=400)


@pytest.mark.timeout(420)
def test_masked_head_equals_full_logits(results):
    for rank, res in enumerate(r["full_head"] for r in results):
        assert set(res) == set(LAYOUTS)
        for name, r in res.items():
            supervised = 10 + 5 + 6
            assert r["full_shape"] == (2, 32) and r["mask_shape"] == (supervised,), (name, r)
            assert abs(r["full"] - r["masked"]) <= 1e-6 * abs(r["full"]), (rank, name, r)
            assert r["grad_rel"] <= 1e-5, (rank, name, r)
            assert r["main_grad_rel"] <= 1e-5, (rank, name, r)
            assert r["n_grads"] > 50  # every parameter, ViT included, took part in backward


@pytest.mark.timeout(420)
def test_masked_head_matches_cross_entropy_on_transformers_logits(results):
    for rank, res in enumerate(r["transformers"] for r in results):
        assert set(res) == set(LAYOUTS)
        for name, r in res.items():
            where = f"rank {rank} {name}"
            assert r["n_tokens"] == (12 + 5 + 6,) * 2, (where, r["n_tokens"])
            assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), (where, r["loss"], r["ref_loss"])
            assert r["token_diff"] <= 1e-4, (where, r["token_diff"])
            # Every LLM parameter: embedding, 4 layers x (qkv w+b, proj, 2 norms, fc1, fc2), final norm, output.
            assert r["n_grads"] == 3 + 4 * 7, (where, r["n_grads"])
            worst = max(r["grad_rel"], key=r["grad_rel"].get)
            assert r["grad_rel"][worst] <= 1e-5, (where, worst, r["grad_rel"][worst])
