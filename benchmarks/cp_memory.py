"""Per-rank peak activation memory of one training step at context parallelism 1, 2 and 4, side by side.

One long causal sequence (packing without reset, as stages 3 and 4 train) of a narrow Long-VITA
(the `tiny` preset's widths and 4 LLM layers, `--layers` for more) takes one real training step,
forward and backward, through the training engine (`engine.train_step`: the CP split of the batch,
ring attention, the logits-masked head, DDP, Adam) on CP ranks spawned over gloo, in one run:

    CP | tokens per rank | tiles per rank | peak MiB per rank | ratio to CP 1 | goal (<= 1.15 / CP)

The sequence repeats one document shape over its whole length: text, a short video (frames of
one tile each, so every CP chunk holds frames) and a supervised answer. As in stages 3 and 4
the ViT is frozen (`--train-vision` trains it) and the LLM and projector train.

What is measured is the step's activation memory. Each rank builds the model, DDP (fp32
main_grad) and Adam, takes a short warm-up step (Adam's state, gloo's buffers and the kernels'
scratch exist after it), builds the long micro-batch (the loader's output: every CP rank holds
the whole micro-batch and cuts its own share inside the step), and only then resets its peak:
Linux's VmHWM restarts from the current resident set (/proc/self/clear_refs), and the peak of
the measured step minus that baseline is printed. On cuda / npu the allocator's peak
(`Platform.memory_stats`) is used the same way. glibc's malloc would keep freed blocks below its
growing mmap threshold inside the process, so the ranks run with MALLOC_MMAP_THRESHOLD_ fixed
at 128 KiB: every tensor of note gets its own mapping, returned when freed, and the resident set
follows the live tensors.

    python benchmarks/cp_memory.py                       # 32K tokens, CP 1 / 2 / 4 (12 min of CPU, 25 min wall on 2 shared cores)
    python benchmarks/cp_memory.py --seq 65536 --cp 1 2 --layers 2
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Dict, List, Optional

GOAL = 1.15  # CP c may use at most GOAL / c of CP 1's peak
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


@dataclasses.dataclass
class StepSpec:
    """One measured step: the sequence, the model depth and the layout."""

    seq: int
    cp: int = 1
    layers: int = 4
    frames_per_doc: int = 16  # video frames per document (one tile, num_image_token + 2 tokens each)
    text_per_doc: int = 64
    answer_per_doc: int = 32  # supervised tokens per document
    algo: str = "ring"
    recompute: Optional[str] = None  # None | full (uniform, 1 layer per unit) | selective
    train_vision: bool = False
    warm_seq: int = 1024
    backend: Optional[str] = None


def bench_model(layers: int, seq: int):
    """The `tiny` preset's widths with `layers` LLM layers and room for `seq` positions."""
    from megatron_vita.config.model import ModelConfig

    cfg = ModelConfig.from_name("tiny")
    cfg.language = dataclasses.replace(cfg.language, num_layers=layers,
                                       max_position_embeddings=max(cfg.language.max_position_embeddings, seq))
    cfg.name = f"tiny-{layers}l"
    return cfg.validate()


def long_sequence(model_config, spec: StepSpec, seq: int, seed: int = 0) -> Dict[str, "object"]:
    """One causal micro-batch of `seq` tokens: documents of text, video frames and a supervised answer
    repeated over the whole sequence (labels pre-shifted), with the pixels of every frame."""
    import torch

    from megatron_vita.data.template import video_token_ids

    gen = torch.Generator().manual_seed(seed)
    tok = model_config.tokens
    high = min([tok.bos_token_id, tok.im_start_token_id, *tok.special.values()])
    video = torch.tensor(video_token_ids(spec.frames_per_doc, tok, model_config.num_image_token))
    ids = torch.randint(0, high, (seq,), generator=gen)
    supervised = torch.zeros(seq, dtype=torch.bool)
    doc = spec.text_per_doc + video.numel() + spec.answer_per_doc
    frames = 0
    for start in range(0, seq - doc + 1, doc):
        a = start + spec.text_per_doc
        ids[a:a + video.numel()] = video
        supervised[a + video.numel():start + doc] = True
        frames += spec.frames_per_doc
    labels = torch.full((seq,), -100, dtype=torch.long)
    at = supervised.nonzero().squeeze(1)
    labels[at - 1] = ids[at]  # pre-shifted: position t predicts token t+1
    size = model_config.vision.image_size
    return {"tokens": ids[None], "labels": labels[None], "loss_mask": (labels != -100).float()[None],
            "pixel_values": torch.randn(frames, 3, size, size, generator=gen)}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


class PeakMeter:
    """The peak growth of this process's memory over a baseline taken at `start()`."""

    def __init__(self):
        from megatron_vita import platform

        self.plat = platform.current()

    def start(self) -> None:
        import gc

        gc.collect()
        self.plat.synchronize()
        if self.plat.name == "cpu":
            self.base = _status("VmRSS:")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM restarts from the current resident set
        else:
            self.plat.reset_peak_memory()
            self.base = self.plat.memory_stats()["allocated"]

    def peak(self) -> int:
        self.plat.synchronize()
        if self.plat.name == "cpu":
            return max(_status("VmHWM:") - self.base, 0)
        return max(self.plat.memory_stats()["max_allocated"] - self.base, 0)


def measure_rank(rank: int, world: int, spec: StepSpec) -> Dict[str, float]:
    """Build, warm up, then one measured training step of the long sequence on this CP rank."""
    import math

    from megatron_vita.config import ParallelConfig
    from megatron_vita.models.long_vita.builder import BuildOptions, build_model_chunks
    from megatron_vita.parallel.context.batch import shard_batch
    from megatron_vita.parallel.state import parallel_layout
    from megatron_vita.training.config import OptimConfig
    from megatron_vita.training.engine import train_step, wrap_ddp
    from megatron_vita.training.optimizer import build_optimizer

    cfg = bench_model(spec.layers, spec.seq)
    par = ParallelConfig(context_parallel_size=spec.cp, context_parallel_algo=spec.algo)
    full = spec.recompute == "full"
    options = BuildOptions(recompute_granularity=spec.recompute, recompute_method="uniform" if full else None,
                           recompute_num_layers=1 if full else None)
    meter = PeakMeter()
    with parallel_layout(par) as info:
        chunks = build_model_chunks(cfg, par, options)
        for c in chunks:
            c.freeze(vision=not spec.train_vision)
        ddp = wrap_ddp(chunks)
        optimizer = build_optimizer(ddp, OptimConfig(lr=1e-5))
        train_step(ddp, optimizer, [long_sequence(cfg, spec, spec.warm_seq, seed=1)])
        batch = long_sequence(cfg, spec, spec.seq)
        meter.start()
        t0 = time.perf_counter()
        result = train_step(ddp, optimizer, [batch])
        seconds = time.perf_counter() - t0
        peak = meter.peak()
        share = batch if spec.cp == 1 else shard_batch(batch, info.cp_rank, spec.cp, par.cp_sequence_multiple,
                                                        cfg.tokens.context_ids, cfg.num_image_token)
    return {"peak": peak, "seconds": seconds, "loss": result.loss, "finite": math.isfinite(result.loss),
            "local_tokens": share["tokens"].shape[1], "tiles": share["pixel_values"].shape[0],
            "all_tiles": batch["pixel_values"].shape[0],
            "batch_bytes": sum(t.numel() * t.element_size() for t in batch.values())}


def run_step(spec: StepSpec, timeout: float = 3600) -> List[Dict[str, float]]:
    """`measure_rank` on spec.cp spawned ranks (malloc returning freed tensors at once); results by rank."""
    return spawn_measured(measure_rank, spec.cp, spec, backend=spec.backend, timeout=timeout)


def spawn_measured(fn, world: int, *args, backend: str = "cpu", timeout: float = 900):
    """platform.spawn with glibc returning freed memory at once (MALLOC_ENV), so that RSS peaks
    measure tensors rather than the allocator's cache (shared by the memory benchmarks)."""
    from megatron_vita import platform

    saved = {k: os.environ.get(k) for k in MALLOC_ENV}
    os.environ.update(MALLOC_ENV)
    try:
        return platform.spawn(fn, world, *args, backend=backend, timeout=timeout)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=32768, help="tokens of the sequence (a multiple of 2 x the largest CP)")
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4], help="context-parallel sizes (1 first)")
    p.add_argument("--layers", type=int, default=4, help="LLM layers (the tiny preset has 4)")
    p.add_argument("--frames-per-doc", type=int, default=16, help="video frames in each repeated document")
    p.add_argument("--algo", default="ring", help="--context-parallel-algo for CP > 1")
    p.add_argument("--recompute", choices=["full", "selective"], default=None)
    p.add_argument("--train-vision", action="store_true", help="train the ViT too (stages 3-4 freeze it)")
    p.add_argument("--backend", default=None, help="cpu | cuda | npu (default: auto)")
    args = p.parse_args(argv)
    sizes = sorted(set(args.cp))
    if sizes[0] != 1:
        p.error("--cp must include 1 (the reference)")
    if args.seq % (2 * sizes[-1]):
        p.error(f"--seq {args.seq} is not a multiple of 2 x CP {sizes[-1]}")

    mib = 2 ** 20
    print(f"one training step of a {args.seq}-token sequence, tiny widths, {args.layers} LLM layers, "
          f"{args.frames_per_doc} frames per document, ViT {'trained' if args.train_vision else 'frozen'}, "
          f"recompute {args.recompute or 'none'}, CP algo {args.algo}", flush=True)
    header = (f"{'CP':>3} | {'tokens/rank':>11} {'tiles/rank':>10} | {'peak MiB/rank':>13} {'min..max':>13} | "
              f"{'ratio':>6} {'goal':>6} {'ok':>3} | {'step s':>6} loss")
    print(header, flush=True)
    ref, failed = None, False
    for cp in sizes:
        spec = StepSpec(seq=args.seq, cp=cp, layers=args.layers, frames_per_doc=args.frames_per_doc, algo=args.algo,
                        recompute=args.recompute, train_vision=args.train_vision, backend=args.backend)
        ranks = run_step(spec)
        peaks = [r["peak"] for r in ranks]
        worst = max(peaks)
        ref = worst if cp == 1 else ref
        ratio, goal = worst / ref, GOAL / cp
        ok = ratio <= goal
        failed |= not ok or not all(r["finite"] for r in ranks)
        print(f"{cp:>3} | {ranks[0]['local_tokens']:>11} {max(r['tiles'] for r in ranks):>10} | "
              f"{worst / mib:>13.0f} {f'{min(peaks) / mib:.0f}..{worst / mib:.0f}':>13} | {ratio:>6.3f} "
              f"{goal:>6.3f} {'yes' if ok else 'NO':>3} | {max(r['seconds'] for r in ranks):>6.1f} "
              f"{ranks[0]['loss']:.5f}", flush=True)
    print(f"input micro-batch (held whole by every rank, not counted): {ranks[0]['batch_bytes'] / mib:.0f} MiB, "
          f"{ranks[0]['all_tiles']} tiles")
    print(f"goal: CP c uses <= {GOAL}/c of CP 1 -> {'met' if not failed else 'NOT met'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
