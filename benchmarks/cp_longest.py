"""The longest sequence that trains one step within a per-rank memory budget, at CP 1 vs CP 2.

For each context-parallel size the ranks are spawned once (gloo), build the narrow Long-VITA of
benchmarks/cp_memory.py (the `tiny` widths, ViT frozen, LLM + projector trained), DDP and Adam,
take a short warm-up step, and then search: the sequence length doubles from `--start` while a
real training step of it (forward + backward + Adam, through `engine.train_step`) stays within
the budget, then the last fitting and the first failing length are bisected down to
`--resolution` tokens. Every probe is a real step of the same sequence shape as cp_memory.py
(text, video frames, a supervised answer, repeated); all ranks take the same decisions (the
largest rank's memory decides).

The budget is per rank and covers what a device would hold: the model's weights, its fp32
gradient buffers and Adam's state (measured once after the warm-up) plus the step's peak
activation memory (cp_memory.py's measurement: VmHWM reset right before the step, malloc
returning freed tensors at once). The input micro-batch, which every rank receives whole from
the loader before cutting its share, is not counted. Printed: each probe, both lengths and
their ratio.

    python benchmarks/cp_longest.py                      # 256 MiB per rank (about 3 min on 2 cores)
    python benchmarks/cp_longest.py --budget-mib 1024 --layers 8
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cp_memory import PeakMeter, StepSpec, bench_model, long_sequence, spawn_measured  # noqa: E402


def _largest(value: float) -> float:
    import torch

    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def search_rank(rank: int, world: int, spec: StepSpec, budget: int, start: int, resolution: int,
                limit: int) -> Dict[str, object]:
    """Doubling then bisection over real training steps on this rank (collective over the world)."""
    import gc
    import math

    from megatron_vita.config import ParallelConfig
    from megatron_vita.models.long_vita.builder import BuildOptions, build_model_chunks
    from megatron_vita.parallel.state import parallel_layout
    from megatron_vita.training.config import OptimConfig
    from megatron_vita.training.engine import train_step, wrap_ddp
    from megatron_vita.training.optimizer import build_optimizer
    from cp_memory import _status

    cfg = bench_model(spec.layers, limit)
    par = ParallelConfig(context_parallel_size=spec.cp, context_parallel_algo=spec.algo)
    full = spec.recompute == "full"
    options = BuildOptions(recompute_granularity=spec.recompute, recompute_method="uniform" if full else None,
                           recompute_num_layers=1 if full else None)
    meter = PeakMeter()
    probes: List[Dict[str, float]] = []
    with parallel_layout(par):
        gc.collect()
        before = _status("VmRSS:")
        chunks = build_model_chunks(cfg, par, options)
        for c in chunks:
            c.freeze(vision=not spec.train_vision)
        ddp = wrap_ddp(chunks)
        optimizer = build_optimizer(ddp, OptimConfig(lr=1e-5))
        train_step(ddp, optimizer, [long_sequence(cfg, spec, spec.warm_seq, seed=1)])
        gc.collect()
        static = _largest(_status("VmRSS:") - before)

        def fits(seq: int) -> bool:
            batch = long_sequence(cfg, spec, seq)
            meter.start()
            t0 = time.perf_counter()
            result = train_step(ddp, optimizer, [batch])
            used = _largest(static + meter.peak())
            ok = used <= budget and math.isfinite(result.loss)
            probes.append({"seq": seq, "used": used, "fits": ok, "seconds": time.perf_counter() - t0})
            del batch
            return ok

        fit, fail, seq = 0, None, start
        while seq <= limit:
            if not fits(seq):
                fail = seq
                break
            fit, seq = seq, seq * 2
        while fail is not None and fail - fit > resolution:
            mid = (fit + fail) // 2 // resolution * resolution
            if fits(mid):
                fit = mid
            else:
                fail = mid
    return {"longest": fit, "first_failing": fail, "static": static, "probes": probes}


def search(spec: StepSpec, budget: int, start: int, resolution: int, limit: int) -> Dict[str, object]:
    return spawn_measured(search_rank, spec.cp, spec, budget, start, resolution, limit,
                          backend=spec.backend, timeout=3600)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-mib", type=int, default=256,
                   help="per-rank memory budget: weights + gradients + Adam + the step's activations")
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2], help="context-parallel sizes to compare")
    p.add_argument("--layers", type=int, default=4, help="LLM layers (the tiny preset has 4)")
    p.add_argument("--start", type=int, default=2048, help="first length tried (then doubled)")
    p.add_argument("--resolution", type=int, default=512, help="bisection stops at this many tokens")
    p.add_argument("--limit", type=int, default=1 << 20, help="longest length tried")
    p.add_argument("--algo", default="ring", help="--context-parallel-algo for CP > 1")
    p.add_argument("--recompute", choices=["full", "selective"], default=None)
    p.add_argument("--backend", default=None, help="cpu | cuda | npu (default: auto)")
    args = p.parse_args(argv)
    for n, name in ((args.start, "--start"), (args.resolution, "--resolution")):
        if n % (2 * max(args.cp)):
            p.error(f"{name} {n} is not a multiple of 2 x CP {max(args.cp)}")

    mib, budget = 2 ** 20, args.budget_mib * 2 ** 20
    print(f"longest sequence training one step within {args.budget_mib} MiB per rank: tiny widths, {args.layers} LLM "
          f"layers, ViT frozen, recompute {args.recompute or 'none'}, resolution {args.resolution} tokens", flush=True)
    found = {}
    for cp in args.cp:
        spec = StepSpec(seq=args.limit, cp=cp, layers=args.layers, algo=args.algo, recompute=args.recompute,
                        backend=args.backend)
        t0 = time.perf_counter()
        res = search(spec, budget, args.start, args.resolution, args.limit)
        for pr in res["probes"]:
            print(f"  CP {cp}: {pr['seq']:>8} tokens -> {pr['used'] / mib:7.0f} MiB per rank "
                  f"({'fits' if pr['fits'] else 'over'}, step {pr['seconds']:.1f} s)", flush=True)
        found[cp] = res["longest"]
        print(f"CP {cp}: longest {res['longest']} tokens (model + gradients + Adam {res['static'] / mib:.0f} MiB; "
              f"search {time.perf_counter() - t0:.0f} s)", flush=True)
    ref = found[args.cp[0]]
    print(" | ".join(f"CP {cp}: {n} tokens" for cp, n in found.items()) + " | " +
          " | ".join(f"CP {cp} / CP {args.cp[0]} = {n / ref:.2f}" for cp, n in found.items() if cp != args.cp[0]
                     and ref))
    return 0


if __name__ == "__main__":
    sys.exit(main())
