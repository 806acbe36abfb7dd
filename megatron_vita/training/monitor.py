"""What a training run reports: Megatron-style iteration lines, metrics, TensorBoard, progress, loss curve.

Rank 0 prints one line per `--log-interval` iterations in Megatron's format (loss, lr, grad norm,
tokens/s, samples/s, memory), writes a JSON line per iteration to `--metrics-file` (with the ids
of the samples every DP rank consumed, so a resumed run can be checked sample by sample),
scalars to TensorBoard, a progress bar when stderr is a terminal, and at the end a loss-curve PNG.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_vita.training.config import TrainConfig


def default_loss_curve(cfg: TrainConfig) -> Optional[str]:
    """Where the loss-curve PNG goes: --loss-curve, else <save>/loss_curve.png, else nowhere."""
    if cfg.loss_curve:
        return cfg.loss_curve
    return os.path.join(cfg.save, "loss_curve.png") if cfg.save else None


def ema(values: Sequence[float], span: int) -> List[float]:
    """Exponential moving average with TensorBoard's debiasing (the start is not pulled to 0)."""
    beta = 1.0 - 2.0 / (span + 1)
    out, acc = [], 0.0
    for t, v in enumerate(values, 1):
        acc = beta * acc + (1.0 - beta) * v
        out.append(acc / (1.0 - beta ** t))
    return out


def plot_loss_curve(points: Sequence[Tuple[int, float]], path: str, title: str = "training loss",
                    stages: Sequence[Tuple[int, str]] = ()) -> None:
    """Write `loss_curve_figure(points, title, stages)` as a PNG at `path`."""
    fig = loss_curve_figure(points, title, stages)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)


def loss_curve_figure(points: Sequence[Tuple[int, float]], title: str = "training loss",
                      stages: Sequence[Tuple[int, str]] = ()):
    """A matplotlib Figure of (iteration, loss): the raw loss, its moving average, and where each stage starts.

    `stages` lists (first iteration, label) of runs drawn on one axis (the demo's stage 1 then
    2): each start after the first point is a dashed line, and the average restarts there (a
    stage changes what trains, so its loss is not a continuation). The y axis is logarithmic when
    the loss spans more than a decade; non-finite losses are left out. The Figure has its own Agg
    canvas: no display, no pyplot state shared with the caller.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    pts = sorted((int(x), float(y)) for x, y in points if math.isfinite(y))
    fig = Figure(figsize=(9, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="major", alpha=0.3)
    if not pts:
        ax.text(0.5, 0.5, "no finite loss values", transform=ax.transAxes, ha="center", va="center")
    else:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        starts = sorted(s for s in stages if xs[0] < s[0] <= xs[-1])
        edges = [xs[0]] + [s[0] for s in starts] + [xs[-1] + 1]
        segments = [[(x, y) for x, y in pts if lo <= x < hi] for lo, hi in zip(edges, edges[1:])]
        # About 15 averages per run; fewer than 3 points per average is no smoothing at all.
        span = min(50, round(len(pts) / 15))
        smoothed = [seg for seg in segments if span >= 3 and len(seg) >= 2 * span]
        ax.plot(xs, ys, color="tab:blue", alpha=0.35 if smoothed else 1.0, linewidth=1, label="loss",
                marker="o" if len(pts) < 30 else None, markersize=3)
        for k, seg in enumerate(smoothed):
            ax.plot([x for x, _ in seg], ema([y for _, y in seg], span), color="tab:blue", linewidth=2,
                    label=f"moving average ({span} iterations)" if k == 0 else None)
        for first, _ in starts:
            ax.axvline(first - 0.5, color="tab:red", linestyle="--", linewidth=1)
        # Each stage's name at the bottom of its part of the axis (losses fall: that corner is free).
        labels = [(xs[0], s[1]) for s in stages if s[0] <= xs[0]][-1:] + starts
        for first, label in labels:
            ax.text(first, 0.02, f" {label}", transform=ax.get_xaxis_transform(), va="bottom", ha="left",
                    color="tab:red" if first > xs[0] else "black")
        if min(ys) > 0 and max(ys) / min(ys) > 10:
            ax.set_yscale("log")
            # Plain numbers (0.1, 1, 10), not 10^0; over two decades or less also 2, 3 and 5 of each.
            def minor(v, _):
                lo, hi = ax.get_ylim()
                mantissa = round(v / 10 ** math.floor(math.log10(v)))
                return f"{v:g}" if math.log10(hi / lo) <= 2 and mantissa in (2, 3, 5) else ""

            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(minor))
        pad = 0.5 if xs[-1] - xs[0] >= 2 else 1.0  # a single point still gets whole-iteration ticks
        ax.set_xlim(xs[0] - pad, xs[-1] + pad)
        ax.legend(loc="upper right")
    return fig


class TrainLogger:
    def __init__(self, cfg: TrainConfig, platform, start: int, consumed: int = 0):
        self.cfg, self.platform = cfg, platform
        self.rank = torch.distributed.get_rank()
        self.writer = self.rank == 0
        self.start = start
        self.points: List[Tuple[int, float]] = []
        self.consumed = consumed  # samples consumed before `start` (from the checkpoint when resuming)
        self.t_start = time.perf_counter()
        self.tb = None
        self.bar = None
        if self.writer and cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(cfg.tensorboard_dir)
        if self.writer and cfg.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.metrics_file)), exist_ok=True)
        if self.writer and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train_iters, initial=start, desc="train", unit="it", dynamic_ncols=True)

    def _print(self, text: str) -> None:
        if not self.writer:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def banner(self, model_config, par, info, n_micro: int, chunks, optimizer) -> None:
        trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
        total = sum(p.numel() for c in chunks for p in c.parameters())
        # A collective's tensor lives on the platform's device (nccl / hccl reduce nothing else).
        counts = torch.tensor([trainable, total], dtype=torch.int64, device=self.platform.device())
        torch.distributed.all_reduce(counts)
        groups = sorted({round(g.get("lr_mult", 1.0), 6) for g in optimizer.param_groups})
        self._print(
            f"> megatron-vita train: model {model_config.name} | backend {self.platform.name} | "
            f"TP={par.tp} PP={par.pp}{f' VPP={par.vpp}' if par.vpp else ''} CP={par.cp} DP={info.dp_size}"
            f"{' SP' if par.sequence_parallel else ''}{' dist-opt' if par.use_distributed_optimizer else ''} | "
            f"micro-batches/step {n_micro} | params {counts[1]:.3e} (trainable, summed over ranks {counts[0]:.3e}) | "
            f"lr multipliers {groups[:6]}{'...' if len(groups) > 6 else ''} | start iteration {self.start}")

    def _gather_samples(self, micro: List[dict]) -> Optional[list]:
        mine = [mb.get("samples") for mb in micro]
        if self.cfg.metrics_file is None or all(m is None for m in mine):
            return None
        from megatron.core import parallel_state as ps

        group = ps.get_data_parallel_group()
        everyone = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(everyone, mine, group=group)
        return everyone

    def iteration(self, it: int, result, micro: List[dict], optimizer, seconds: float) -> Dict[str, float]:
        from megatron.core import parallel_state as ps

        dp = ps.get_data_parallel_world_size()
        tokens = sum(int(mb["tokens"].numel()) for mb in micro) * dp
        samples = sum(int(mb.get("num_samples", mb["tokens"].shape[0])) for mb in micro) * dp
        self.consumed += samples
        lr = max(g["lr"] / max(g.get("lr_mult", 1.0), 1e-30) for g in optimizer.param_groups)
        mem = self.platform.memory_stats()["max_allocated"] / 2 ** 20
        stats = {"iteration": it, "consumed_samples": self.consumed, "loss": result.loss, "lr": lr,
                 "grad_norm": result.grad_norm, "tokens_per_s": tokens / seconds, "samples_per_s": samples / seconds,
                 "seconds": seconds, "skipped": result.skipped, "supervised_tokens": result.supervised_tokens,
                 "max_mem_mb": mem}
        sample_ids = self._gather_samples(micro)
        if not self.writer:
            return stats
        self.points.append((it, result.loss))
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"):
                if stats[key] is not None:
                    self.tb.add_scalar(f"train/{key}", stats[key], it)
        if self.cfg.metrics_file:
            with open(self.cfg.metrics_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(dict(stats, samples=sample_ids)) + "\n")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{result.loss:.4f}")
        if it % max(self.cfg.log_interval, 1) == 0 or it == self.cfg.train_iters:
            grad = f"{result.grad_norm:.3f}" if result.grad_norm is not None else "n/a"
            self._print(
                f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {it:8d}/{self.cfg.train_iters:8d} | "
                f"consumed samples: {self.consumed:10d} | elapsed time per iteration (ms): {seconds * 1e3:.1f} | "
                f"learning rate: {lr:.6E} | global batch size: {self.cfg.global_batch_size:5d} | "
                f"lm loss: {result.loss:.6E} | grad norm: {grad} | tokens/s: {tokens / seconds:.0f} | "
                f"samples/s: {samples / seconds:.2f} | mem (MB): {mem:.0f} |"
                + (" skipped |" if result.skipped else ""))
        return stats

    def finish(self, data_stats: dict) -> None:
        if not self.writer:
            return
        if self.bar is not None:
            self.bar.close()
        summary = data_stats.get("summary") if isinstance(data_stats, dict) else None
        if summary:
            self._print(f"> data: {summary}")
        path = default_loss_curve(self.cfg)
        if path and self.points:
            plot_loss_curve(self.points, path, title=f"lm loss ({os.path.basename(self.cfg.recipe)})")
            self._print(f"> loss curve: {path}")
        self._print(f"> training done in {time.perf_counter() - self.t_start:.1f}s")
        if self.tb is not None:
            self.tb.close()
