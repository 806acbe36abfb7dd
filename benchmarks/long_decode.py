"""Decoding after a long prompt: the engine's KV cache vs re-running the whole sequence per token.

Side by side in one run, on the same spawned ranks and weights (tiny widths, random
initialisation): `new` tokens are generated greedily after a `prompt`-token prompt (text and a
video's frames), once with the KV cache (one prefill, then one token per forward; under CP
every rank attends over its own share of the cache and the partials are merged), once the way
the original Megatron server did it under CP: every token re-runs the whole prompt + answer
so far, images included, through the same prefill path (ring attention, logits-masked head).
Both must choose the same tokens. Printed: time to the first token, per-token decode time,
the whole answer's time for each, and the ratio (goal >= 20x for 64 tokens after 16K).

    python benchmarks/long_decode.py                           # 16K prompt, 64 tokens, CP 2
    python benchmarks/long_decode.py --prompt 4096 --new 16 --cp 1
    python benchmarks/long_decode.py --reprefill-steps 8       # re-prefill timed on 8 steps, scaled to --new
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cp_memory import bench_model  # noqa: E402  (the benchmarks' tiny model with n layers)

GOAL = 20.0


def prompt(cfg, length: int, frames: int, seed: int = 0):
    """`length` token ids: a video of `frames` frames after a few text tokens, then text."""
    import torch

    from megatron_vita.data.template import video_token_ids

    gen = torch.Generator().manual_seed(seed)
    tok = cfg.tokens
    high = min([tok.bos_token_id, tok.im_start_token_id, *tok.special.values()])
    ids = torch.randint(0, high, (length,), generator=gen)
    video = torch.tensor(video_token_ids(frames, tok, cfg.num_image_token)) if frames else torch.zeros(0, dtype=torch.long)
    ids[8:8 + video.numel()] = video
    size = cfg.vision.image_size
    return ids, torch.randn(frames, 3, size, size, generator=gen) if frames else None


def run_rank(rank, world, layers, par, length, new, frames, reprefill_steps):
    import torch
    import torch.distributed as dist

    from megatron_vita.inference.engine.runner import RankEngine
    from megatron_vita.inference.engine.sampling import Sampling, choose

    cfg = bench_model(layers, length + new)
    engine = RankEngine(cfg, par, None)
    ids, pixels = prompt(cfg, length, frames)
    greedy = Sampling(max_new_tokens=new)
    engine.generate(ids[:256], None, Sampling(max_new_tokens=2), stop_ids=[])  # warm-up

    dist.barrier()
    stamps = [time.perf_counter()]
    tokens = []
    for token in engine.steps(ids, pixels, greedy, stop_ids=[]):
        tokens.append(token)
        stamps.append(time.perf_counter())
    kv_first, kv_total = stamps[1] - stamps[0], stamps[-1] - stamps[0]

    steps = min(reprefill_steps, new)
    times, same = [], True
    with torch.no_grad():
        for i in range(steps):
            seq = torch.cat([ids, torch.tensor(tokens[:i], dtype=torch.long)])
            dist.barrier()
            t0 = time.perf_counter()
            engine.cache.reset(engine.reserve_for(seq.shape[0], 0))
            logits, holder = engine.prefill(seq, pixels)
            chosen = torch.zeros(1, dtype=torch.long, device=engine.device)
            if engine.rank == holder:
                chosen[0] = choose(logits, [], greedy)
            dist.broadcast(chosen, src=holder)
            times.append(time.perf_counter() - t0)
            same &= int(chosen) == tokens[i]
    engine.cache.reset()
    return dict(kv_first=kv_first, kv_total=kv_total, kv_decode=(kv_total - kv_first) / max(new - 1, 1),
                re_times=times, same=same)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=int, default=16384, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="tokens to generate")
    p.add_argument("--cp", type=int, default=2, help="context-parallel size (ring)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--layers", type=int, default=4, help="LLM layers (tiny widths)")
    p.add_argument("--frames", type=int, default=16, help="video frames in the prompt (re-encoded per re-prefill)")
    p.add_argument("--reprefill-steps", type=int, default=None,
                   help="re-prefill steps actually timed (default: all --new); the mean is scaled to --new")
    p.add_argument("--backend", default="cpu")
    args = p.parse_args(argv)
    from megatron_vita import platform
    from megatron_vita.config.parallel import ParallelConfig

    par = ParallelConfig(tensor_model_parallel_size=args.tp, context_parallel_size=args.cp)
    steps = args.reprefill_steps or args.new
    ranks = platform.spawn(run_rank, par.model_parallel_size, args.layers, par, args.prompt, args.new, args.frames,
                           steps, backend=args.backend, timeout=7200)
    r = max(ranks, key=lambda x: x["kv_total"])
    re_step = max(sum(x["re_times"]) / len(x["re_times"]) for x in ranks)
    re_total = re_step * args.new
    print(f"{args.new} tokens after a {args.prompt}-token prompt ({args.frames} video frames), tiny widths, "
          f"{args.layers} layers, {par.describe()}, backend {args.backend}")
    print(f"{'path':<22} | {'first token s':>13} | {'per token s':>11} | {'answer s':>9}")
    print(f"{'KV cache':<22} | {r['kv_first']:>13.3f} | {r['kv_decode']:>11.4f} | {r['kv_total']:>9.2f}")
    scaled = "" if steps == args.new else f" (mean of {steps} steps x {args.new})"
    print(f"{'re-prefill per token':<22} | {re_step:>13.3f} | {re_step:>11.4f} | {re_total:>9.2f}{scaled}")
    ratio = re_total / r["kv_total"]
    same = all(x["same"] for x in ranks)
    print(f"same tokens: {'yes' if same else 'NO'}; speed-up {ratio:.1f}x for the whole answer, "
          f"{re_step / r['kv_decode']:.0f}x per decoded token (goal >= {GOAL:.0f}x: {'met' if ratio >= GOAL else 'NOT met'})")
    return 0 if same and ratio >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
