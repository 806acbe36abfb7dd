"""What a training run reports: Megatron-style iteration lines, metrics, TensorBoard, progress, loss curve.

Rank 0 prints one line per `--log-interval` iterations in Megatron's format (loss, lr, grad norm,
tokens/s, samples/s, memory), writes a JSON line per iteration to `--metrics-file` (with the ids
of the samples every DP rank consumed, so a resumed run can be checked sample by sample),
scalars to TensorBoard, a progress bar when stderr is a terminal, and at the end a loss-curve PNG.
"""
from __future__ import annotations

import json
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


def plot_loss_curve(points: Sequence[Tuple[int, float]], path: str, title: str = "training loss") -> None:
    """A plain line chart (PIL only) of (iteration, loss)."""
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 720, 420, 70, 20, 40, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 12), title, fill="black")
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

        def px(x, y):
            return (left + (x - x0) / (x1 - x0) * (w - left - right),
                    h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

        d.rectangle([left, top, w - right, h - bottom], outline="black")
        for k in range(5):
            yv = y0 + (y1 - y0) * k / 4
            _, yy = px(x0, yv)
            d.line([left - 4, yy, left, yy], fill="black")
            d.text((4, yy - 6), f"{yv:.3f}", fill="black")
        for k in range(5):
            xv = x0 + (x1 - x0) * k / 4
            xx, _ = px(xv, y0)
            d.line([xx, h - bottom, xx, h - bottom + 4], fill="black")
            d.text((xx - 10, h - bottom + 8), f"{int(round(xv))}", fill="black")
        d.line([px(x, y) for x, y in points] if len(points) > 1 else [px(*points[0])] * 2, fill=(200, 40, 40), width=2)
        d.text((w // 2 - 30, h - 20), "iteration", fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


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
        counts = torch.tensor([trainable, total], dtype=torch.float64)
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
