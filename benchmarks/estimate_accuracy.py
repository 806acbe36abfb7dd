"""`megatron-vita estimate` against measured peaks of real training steps, side by side.

Each configuration trains for real on this machine: its ranks are spawned over gloo, build the
model, DDP and optimizer with the training loop's own `setup_model_and_optimizer`, take one short
step (so Adam's state exists), then one measured step of `engine.train_step` on synthetic
multimodal micro-batches (video frames, supervised tail). Before that, each rank runs the same
layout once with the tiny preset and frees it, so the modules the training path imports lazily and
torch's / gloo's one-time set-up are in the baseline: program state, not memory the estimate counts.
Each rank reports the growth of its peak resident set over that baseline, taken before the
measured model is built (Linux VmHWM, reset through /proc/self/clear_refs right before the measured
step, so the peak covers weights, gradients, optimizer state, the batch and the step's
activations). The estimate for the same configuration (megatron_vita.estimate, which never sees
these numbers) is printed next to the largest measurement of each pipeline stage, with their ratio;
the static columns compare weights + gradients + optimizer state with the resident growth after
the short step, when no activation is alive.

glibc's malloc keeps freed blocks below its mmap threshold (which grows up to 32 MiB as large
blocks are freed) inside the process, so the resident set would include memory no tensor holds.
The ranks run with MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB: every tensor of note gets its own
mapping and returns it when freed, and the resident set follows live tensors (what a GPU's
max_memory_allocated reports). What the estimate does not model (allocator caching, gloo's
buffers, the CPU kernels' scratch) stays in the measurement.

    python benchmarks/estimate_accuracy.py               # every configuration
    python benchmarks/estimate_accuracy.py --only seq8k-tp2-sp pp2-2mb
    python benchmarks/estimate_accuracy.py --backend cuda   # peaks of device memory instead

The whole run takes about 9.5 CPU-minutes (2 cores: under 10 minutes; it took 18 while other jobs
shared the cores). Exit status 1 when an estimate is more than 15% off its measurement.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

TOLERANCE = 0.15


def bench_model():
    """A narrow Long-VITA: activations dominate at a few thousand tokens, steps take seconds."""
    from megatron_vita.config.model import LanguageConfig, ModelConfig, ProjectorConfig, TokenIds, VisionConfig

    vocab = 8192
    return ModelConfig(
        vision=VisionConfig(hidden_size=128, num_layers=2, num_attention_heads=4, ffn_hidden_size=256,
                            image_size=112, patch_size=14),
        projector=ProjectorConfig(ffn_hidden_size=128),
        language=LanguageConfig(vocab_size=vocab, hidden_size=256, num_layers=4, num_attention_heads=8,
                                num_query_groups=2, ffn_hidden_size=768, max_position_embeddings=1 << 17),
        tokens=TokenIds.at_end_of_vocab(vocab), name="bench",
    ).validate()


@dataclass
class Case:
    name: str
    seq: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sp: bool = False
    dist_opt: bool = False
    bf16: bool = False
    recompute: Optional[str] = None  # None | selective | full (uniform, 1 layer per unit)
    micro_batches: int = 1
    frames: int = 0
    train_vision: bool = True
    supervised: int = 256

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


CASES = [
    Case("seq4k", 4096),
    Case("seq8k", 8192),
    Case("seq8k-tp2-sp", 8192, tp=2, sp=True),
    Case("seq8k-tp2", 8192, tp=2, recompute="selective"),
    Case("seq12k-full-recompute", 12288, recompute="full"),
    Case("pp2-2mb", 8192, pp=2, micro_batches=2),
    Case("frames-vit", 4096, frames=96),
    Case("seq8k-cp2-ring", 8192, cp=2),
    Case("bf16-tp2-sp-distopt-dp2", 4096, tp=2, dp=2, sp=True, dist_opt=True, bf16=True),
]


def estimate_inputs(case: Case):
    from megatron_vita.config import ParallelConfig
    from megatron_vita.estimate import EstimateInputs

    par = ParallelConfig(tensor_model_parallel_size=case.tp, pipeline_model_parallel_size=case.pp,
                         context_parallel_size=case.cp, sequence_parallel=case.sp,
                         use_distributed_optimizer=case.dist_opt)
    full = case.recompute == "full"
    return EstimateInputs(
        model=bench_model(), parallel=par, seq_length=case.seq, data_parallel_size=case.dp,
        micro_batch_size=1, global_batch_size=case.micro_batches * case.dp, bf16=case.bf16,
        recompute_granularity=case.recompute, recompute_method="uniform" if full else None,
        recompute_num_layers=1 if full else None, frames=case.frames, supervised_tokens=case.supervised,
        train_vision=case.train_vision)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def _memory(peak: bool = False) -> int:
    """This rank's memory now (or its peak): the resident set on cpu, device memory on an accelerator."""
    from megatron_vita import platform

    plat = platform.current()
    plat.synchronize()
    if plat.name == "cpu":
        return _status("VmHWM:" if peak else "VmRSS:")
    return plat.memory_stats()["max_allocated" if peak else "allocated"]


def _reset_peak() -> None:
    from megatron_vita import platform

    plat = platform.current()
    if plat.name == "cpu":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak restarts from the current resident set
    else:
        plat.reset_peak_memory()


def microbatch(model_config, seq: int, frames: int, supervised: int, seed: int) -> Dict[str, "object"]:
    """A packed-sequence stand-in: text, `frames` video frames, text; the last `supervised` positions
    carry (pre-shifted) labels."""
    import torch

    from megatron_vita.data.template import video_token_ids

    gen = torch.Generator().manual_seed(seed)
    tok = model_config.tokens
    high = min([tok.bos_token_id, tok.im_start_token_id, *tok.special.values()])
    ids = torch.randint(0, high, (seq,), generator=gen)
    media = video_token_ids(frames, tok, model_config.num_image_token)
    ids[8:8 + len(media)] = torch.tensor(media, dtype=ids.dtype)
    supervised = min(supervised, seq // 4)
    labels = torch.full((seq,), -100, dtype=torch.long)
    labels[seq - supervised - 1:-1] = ids[seq - supervised:]
    size = model_config.vision.image_size
    return {"tokens": ids[None], "labels": labels[None], "loss_mask": (labels != -100).float()[None],
            "pixel_values": torch.randn(frames, 3, size, size, generator=gen)}


def _train(case: Case, model_config, seq: int, frames: int, warm_seq: int, measure: bool):
    """Build the model, DDP and optimizer; one step at `warm_seq` (Adam's state appears), then, if
    `measure`, one step at `seq` with the peak counter reset just before it."""
    import gc

    from megatron_vita.parallel.state import destroy_parallel, initialize_parallel
    from megatron_vita.training.config import OptimConfig, TrainConfig
    from megatron_vita.training.engine import train_step
    from megatron_vita.training.loop import setup_model_and_optimizer

    par = estimate_inputs(case).parallel
    info = initialize_parallel(par, seed=1234)
    full = case.recompute == "full"
    cfg = TrainConfig(parallel=par, bf16=case.bf16, optim=OptimConfig(lr=1e-4), recompute_granularity=case.recompute,
                      recompute_method="uniform" if full else None, recompute_num_layers=1 if full else None,
                      freeze_vision=not case.train_vision)
    gc.collect()
    base = _memory()
    out = {"pp_rank": info.pp_rank}
    try:
        ddp, optimizer, _ = setup_model_and_optimizer(cfg, model_config, par)
        warm = [microbatch(model_config, warm_seq, frames, case.supervised, info.dp_rank * 100 + i)
                for i in range(case.micro_batches)]
        train_step(ddp, optimizer, warm)
        del warm
        gc.collect()
        out["static"] = _memory() - base
        if measure:
            _reset_peak()
            micro = [microbatch(model_config, seq, frames, case.supervised, info.dp_rank * 100 + i)
                     for i in range(case.micro_batches)]
            t0 = time.perf_counter()
            train_step(ddp, optimizer, micro)
            out["seconds"] = time.perf_counter() - t0
            out["peak"] = _memory(peak=True) - base
        del ddp, optimizer
    finally:
        destroy_parallel()
        gc.collect()
    return out


def _rank(rank: int, world: int, case: Case) -> Dict[str, int]:
    from megatron_vita.config.model import ModelConfig

    # A throwaway run of the tiny preset in the same layout first: every module the training path
    # imports lazily, torch's and gloo's one-time set-up are then part of the baseline (program
    # state, not tensors the estimate counts).
    tiny = ModelConfig.from_name("tiny")
    _train(case, tiny, 0, 1, 128, measure=False)
    model_config = bench_model()
    warm_seq = max(512, case.frames * (model_config.num_image_token + 2) + case.supervised + 64)
    return _train(case, model_config, case.seq, case.frames, warm_seq, measure=True)


def measure(case: Case, backend: Optional[str] = "cpu") -> List[Dict[str, int]]:
    from cp_memory import spawn_measured  # a sibling script (benchmarks/ is on sys.path when run)

    return spawn_measured(_rank, case.world, case, backend=backend, timeout=900)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=None, help="run only these configurations (by name)")
    p.add_argument("--backend", default="cpu", help="cpu (default) | cuda | npu | auto: on an accelerator the "
                   "peaks are its allocated memory (Platform.memory_stats) instead of the resident set")
    args = p.parse_args(argv)
    from megatron_vita.estimate import estimate

    cases = [c for c in CASES if args.only is None or c.name in args.only]
    mib = 2 ** 20
    print(f"{'configuration':<26} {'stage':>5} | {'estimate MiB':>12} {'measured MiB':>12} {'ratio':>6} | "
          f"{'static est':>10} {'static meas':>11} | {'step s':>6}")
    worst, t_start = 0.0, time.perf_counter()
    for case in cases:
        est = estimate(estimate_inputs(case))
        ranks = measure(case, args.backend)
        for stage in est.stages:
            mine = [r for r in ranks if r["pp_rank"] == stage.pp_rank]
            peak = max(r["peak"] for r in mine)
            static = max(r["static"] for r in mine)
            ratio = stage.total / peak
            worst = max(worst, abs(ratio - 1))
            est_static = stage.get("weights") + stage.get("gradients") + stage.get("optimizer")
            print(f"{case.name:<26} {stage.pp_rank:>5} | {stage.total / mib:>12.1f} {peak / mib:>12.1f} "
                  f"{ratio:>6.3f} | {est_static / mib:>10.1f} {static / mib:>11.1f} | "
                  f"{max(r['seconds'] for r in mine):>6.1f}", flush=True)
    ok = worst <= TOLERANCE
    print(f"worst |estimate / measured - 1| = {worst:.3f} ({'within' if ok else 'OUTSIDE'} {TOLERANCE:.0%}); "
          f"{time.perf_counter() - t_start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
