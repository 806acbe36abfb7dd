"""Peak memory of prefill with and without `prefill_chunk`, at growing prompt lengths, side by side.

The engine's prefill (tiny widths, random initialisation) fills the KV cache from a text +
video prompt, once in one piece and once in chunks of `--chunk` tokens. The KV cache itself
grows with the prompt whatever the chunking (it is what decoding needs); what chunking bounds is
everything else: hidden states, MLP and attention temporaries, the ViT's tiles. Printed per
length: the peak growth of the process's memory during prefill (Linux VmHWM over the resident
set before it, malloc returning freed blocks at once; allocator peaks on an accelerator), the
KV cache's bytes, and their difference (the activations). Goal: the chunked activations stay
flat in the prompt length beyond the chunk, the unchunked ones grow with it.

    python benchmarks/prefill_memory.py                         # 2K..16K tokens, chunk 1K, CP 1
    python benchmarks/prefill_memory.py --lengths 4096 32768 --chunk 2048 --layers 2
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cp_memory import PeakMeter, bench_model, spawn_measured  # noqa: E402  (the memory benchmarks' shared parts)
from long_decode import prompt  # noqa: E402

GOAL = 1.25  # chunked activations at the longest prompt <= GOAL x those at the shortest


def measure_rank(rank, world, layers, lengths, chunk, frames):
    from megatron_vita.config.parallel import ParallelConfig
    from megatron_vita.inference.engine.runner import RankEngine

    cfg = bench_model(layers, max(lengths))
    engine = RankEngine(cfg, ParallelConfig(), None)
    meter = PeakMeter()
    warm, _ = prompt(cfg, min(lengths), frames)
    engine.prefill(warm, None, chunk=chunk)  # first-call allocations (thread pools, caches) are not prefill's
    out = []
    for length in lengths:
        ids, pixels = prompt(cfg, length, frames)
        for size in (None, chunk):
            engine.cache.release()
            engine.cache.reset(engine.reserve_for(length, 0))
            meter.start()
            engine.prefill(ids, pixels, chunk=size)
            peak = meter.peak()
            out.append(dict(length=length, chunk=size, peak=peak, cache=engine.cache_bytes()))
            engine.cache.release()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--backend", default="cpu")
    args = p.parse_args(argv)
    rows = spawn_measured(measure_rank, 1, args.layers, sorted(args.lengths), args.chunk, args.frames,
                          backend=args.backend, timeout=7200)[0]
    mib = 2 ** 20
    print(f"prefill of a text + {args.frames}-frame video prompt, tiny widths, {args.layers} layers, CP 1, "
          f"backend {args.backend}; MiB")
    print(f"{'tokens':>7} | {'one piece: peak':>15} {'KV':>6} {'activ.':>7} | "
          f"{f'chunk {args.chunk}: peak':>16} {'KV':>6} {'activ.':>7}")
    by = {(r["length"], r["chunk"]): r for r in rows}
    act = {}
    for length in sorted(args.lengths):
        a, b = by[(length, None)], by[(length, args.chunk)]
        act[length] = ((a["peak"] - a["cache"]) / mib, (b["peak"] - b["cache"]) / mib)
        print(f"{length:>7} | {a['peak'] / mib:>15.1f} {a['cache'] / mib:>6.1f} {act[length][0]:>7.1f} | "
              f"{b['peak'] / mib:>16.1f} {b['cache'] / mib:>6.1f} {act[length][1]:>7.1f}")
    lo, hi = min(act), max(act)
    growth = act[hi][1] / max(act[lo][1], 1e-9)
    ok = growth <= GOAL
    print(f"chunked activations {act[lo][1]:.1f} -> {act[hi][1]:.1f} MiB from {lo} to {hi} tokens ({growth:.2f}x; "
          f"unchunked {act[hi][0] / max(act[lo][0], 1e-9):.2f}x); goal flat (<= {GOAL}x): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
