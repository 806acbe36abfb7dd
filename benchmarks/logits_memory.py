"""Peak memory and time of LM head + loss: logits-masked head vs full logits, side by side.

For each sequence length S the real head code (megatron_vita.models.heads) runs forward and
backward in a fresh process with Long-VITA's vocabulary (V = 152064): once computing full
[S, V] logits then the loss over supervised tokens, once selecting the k supervised positions
before the output projection. Printed: peak extra memory (RSS growth on CPU, allocator peak on
GPU/NPU) and time of each, and their ratios. The loss values of both are printed too: they agree.
As in training under megatron's DDP, the output weight has its persistent fp32 gradient buffer
(main_grad) before measuring, so both paths are charged only for what head + loss add.

    python benchmarks/logits_memory.py                      # S = 4K, 8K, 16K; k = 256
    python benchmarks/logits_memory.py --seq 4096 --supervised 256 --hidden 5120
"""
from __future__ import annotations

import argparse
import resource
import time

V = 152064


def _measure(rank, world, s, k, hidden, dtype_name, masked, seed):
    import psutil
    import torch

    from megatron_vita import platform
    from megatron_vita.models import heads
    from megatron_vita.parallel.state import initialize_parallel
    from megatron_vita.config import ParallelConfig

    initialize_parallel(ParallelConfig())
    plat = platform.current()
    dtype = getattr(torch, dtype_name)
    device = plat.device()
    g = torch.Generator().manual_seed(seed)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter((torch.randn(V, hidden, generator=g) * 0.02).to(dtype).to(device))

    class Config:
        sequence_parallel = False

    head = Head()
    # As in training: megatron's DDP gives every parameter a persistent fp32 gradient buffer
    # (main_grad) at start-up; the head accumulates its weight gradient there.
    head.weight.main_grad = torch.zeros(V, hidden, dtype=torch.float32, device=device)
    head.weight.grad_added_to_main_grad = False
    hidden_states = (torch.randn(s, 1, hidden, generator=g)).to(dtype).to(device).requires_grad_()
    labels = torch.full((1, s), -100, dtype=torch.long)
    positions = torch.randperm(s, generator=g)[:k]
    labels[0, positions] = torch.randint(0, V, (k,), generator=g)
    loss_mask = (labels != -100).float()
    labels, loss_mask = labels.to(device), loss_mask.to(device)
    plat.synchronize()
    plat.reset_peak_memory()
    if plat.name == "cpu":
        base = psutil.Process().memory_info().rss
    else:
        base = plat.memory_stats()["allocated"]
    t0 = time.perf_counter()
    fn = heads.masked_language_model_loss if masked else heads.language_model_loss
    losses = fn(head, hidden_states, labels, loss_mask, Config())
    loss = losses.sum() / loss_mask.sum()
    loss.backward()
    plat.synchronize()
    seconds = time.perf_counter() - t0
    if plat.name == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    else:
        peak = plat.memory_stats()["max_allocated"] - base
    return {"peak_bytes": max(peak, 0), "seconds": seconds, "loss": loss.item()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384], help="sequence lengths S")
    p.add_argument("--supervised", type=int, default=256,
                   help="supervised tokens k per sequence (answers are short next to long video prompts)")
    p.add_argument("--hidden", type=int, default=1024,
                   help="hidden size (Long-VITA's is 5120; logits memory does not depend on it)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--backend", default=None, help="cpu | cuda | npu (default: auto)")
    args = p.parse_args(argv)

    from megatron_vita import platform

    print(f"LM head + loss, V={V}, hidden={args.hidden}, {args.dtype}, k={args.supervised} supervised tokens")
    print(f"{'S':>7} | {'full peak MB':>12} {'masked peak MB':>14} {'mem ratio':>9} | "
          f"{'full s':>7} {'masked s':>8} {'speedup':>7} | loss full / masked")
    for s in args.seq:
        k = min(args.supervised, s)
        res = {}
        for masked in (False, True):
            res[masked] = platform.spawn(_measure, 1, s, k, args.hidden, args.dtype, masked, 0,
                                         backend=args.backend, timeout=3600, threads=2)[0]
        full, msk = res[False], res[True]
        ratio = full["peak_bytes"] / max(msk["peak_bytes"], 1)
        print(f"{s:>7} | {full['peak_bytes'] / 2**20:>12.0f} {msk['peak_bytes'] / 2**20:>14.0f} {ratio:>8.1f}x | "
              f"{full['seconds']:>7.2f} {msk['seconds']:>8.2f} {full['seconds'] / msk['seconds']:>6.1f}x | "
              f"{full['loss']:.6f} / {msk['loss']:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
