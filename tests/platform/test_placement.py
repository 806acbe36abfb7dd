"""Nothing is left behind on the host: the model, the batches and their parts follow the platform's device.

The platform's device is replaced by another device type, `meta` (a CPU-backed custom device
through torch's PrivateUse1 needs a C++ allocator; meta has none of that and still is a device
of its own, so any tensor left on the CPU shows). In one spawned rank (megatron needs its
process groups) the built Long-VITA chunk, with the ViT, projector, LLM and head, must have every
parameter and buffer on it, and so must the micro-batches the training step and the forward
pass prepare (tokens, labels, masks, pixels, image indices, position ids, packed boundaries and
the PackedSeqParams handed to the model). On the old code the chunk was built on the CPU with
`use_cpu_initialization=True` and batches went to the model as the loader made them. The same
rank checks that megatron's on-device initialisation (the accelerators' default, run here on the
CPU) is reproducible: two fresh builds with one seed are equal.

In the pytest process: `to_device` walks nested batches (dicts, lists, named tuples,
dataclasses), moves every tensor, leaves other values alone, and on the host returns the very
same tensors (the CPU path does not copy).
"""
import collections
import dataclasses

import pytest
import torch

from mv_testlib import multimodal_batch, spawn

META = torch.device("meta")


def _packed(cfg):
    """A packed micro-batch: two documents (text, then an image tile) with their boundaries."""
    a, b = multimodal_batch(cfg, kinds=("text", "image1"), seq_len=24, seed=3)
    batch = {k: torch.cat([a[k], b[k]], dim=1) for k in ("tokens", "labels", "loss_mask")}
    batch.update(pixel_values=b["pixel_values"], cu_seqlens=torch.tensor([0, 24, 48], dtype=torch.int32),
                 position_ids=torch.cat([torch.arange(24), torch.arange(24)])[None], num_samples=2,
                 samples=[["demo", 0], ["demo", 1]])
    return batch


def _device_init_reproducible(cfg, par):
    """Megatron's on-device initialisation (what an accelerator uses), run here on the CPU: the
    same seed gives the same weights (the generator and the RNG tracker are seeded before the build)."""
    from megatron_vita.models.long_vita.builder import BuildOptions, build_model_chunks
    from megatron_vita.parallel.state import initialize_parallel

    states = []
    for _ in range(2):
        initialize_parallel(par, seed=5)
        (chunk,) = build_model_chunks(cfg, par, BuildOptions(use_cpu_initialization=False))
        assert chunk.config.use_cpu_initialization is False
        states.append({k: v.clone() for k, v in chunk.state_dict().items() if isinstance(v, torch.Tensor)})
    return len(states[0]) > 20 and all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def _placement_rank(rank, world):
    from megatron_vita.config import ModelConfig, ParallelConfig
    from megatron_vita.models.long_vita.builder import build_model_chunks
    from megatron_vita.parallel.pipeline import model_inputs, prepare_microbatches
    from megatron_vita.parallel.state import destroy_parallel, initialize_parallel
    from megatron_vita.platform import Platform, placement

    cfg = ModelConfig.from_name("tiny")
    par = ParallelConfig()
    out = {"reproducible": _device_init_reproducible(cfg, par)}
    initialize_parallel(par, seed=1)
    Platform.device = lambda self, local_rank=None: META  # this rank's platform now answers meta
    try:
        chunks = build_model_chunks(cfg, par)
        out.update(chunk=[p for c in chunks for p in placement.tensors_off(c, META)])
        out.update(n_tensors=sum(1 for c in chunks for _ in list(c.parameters()) + list(c.buffers())),
                   use_cpu_initialization=chunks[0].config.use_cpu_initialization)
        micro = multimodal_batch(cfg, kinds=("image3", "video2"), seq_len=40) + [_packed(cfg)]
        prepared = prepare_microbatches(chunks, micro)
        out["batch"] = placement.tensors_off(prepared, META)
        out["inputs"] = [p for mb in prepared for p in placement.tensors_off(model_inputs(mb), META)]
        out["packed"] = model_inputs(prepared[-1])["packed_seq_params"] is not None
        out["kept"] = prepared[-1]["samples"] == micro[-1]["samples"] and prepared[-1]["num_samples"] == 2
        return out
    finally:
        destroy_parallel()


@pytest.mark.timeout(180)
def test_model_and_prepared_batches_land_on_the_platform_device():
    (r,) = spawn(_placement_rank, 1, timeout=150)
    assert r["n_tensors"] > 20
    assert r["chunk"] == [], f"left behind: {r['chunk'][:8]}"
    # Off the host megatron initialises on the device itself, as Megatron-LM does by default.
    assert r["use_cpu_initialization"] is False
    assert r["reproducible"], "two fresh on-device initialisations with one seed differ"
    assert r["packed"] and r["kept"]
    assert r["batch"] == [], f"batch tensors left behind: {r['batch'][:8]}"
    assert r["inputs"] == [], f"model inputs left behind: {r['inputs'][:8]}"


@dataclasses.dataclass
class _Params:
    cu: torch.Tensor
    longest: int
    padded: object = None


_Pair = collections.namedtuple("_Pair", "left right")


def _nested():
    return {"tokens": torch.arange(6)[None], "list": [torch.ones(2), 3, "name"],
            "pair": _Pair(torch.zeros(1), None), "params": _Params(torch.tensor([0, 3, 6]), 3),
            "nested": {"pixels": torch.randn(1, 3, 2, 2)}, "count": 2}


def test_to_device_moves_every_tensor_of_a_nested_batch():
    from megatron_vita.platform import placement

    batch = _nested()
    moved = placement.to_device(batch, META)
    assert placement.tensors_off(batch, META)  # the host batch is untouched
    assert placement.tensors_off(moved, META) == []
    assert moved["list"][1:] == [3, "name"] and moved["count"] == 2 and moved["params"].longest == 3
    assert isinstance(moved["pair"], _Pair) and moved["pair"].right is None
    assert moved["tokens"].shape == (1, 6) and moved["nested"]["pixels"].dtype == torch.float32


def test_to_device_on_the_host_returns_the_same_tensors():
    from megatron_vita.platform import placement

    batch = _nested()
    same = placement.to_device(batch, torch.device("cpu"))
    assert same["tokens"] is batch["tokens"] and same["params"].cu is batch["params"].cu
    assert same["nested"]["pixels"] is batch["nested"]["pixels"]
    assert placement.tensors_off(same, torch.device("cpu")) == []
