"""`megatron-vita demo`: the whole pipeline on a laptop, and proof that it learns.

1. make the synthetic demo dataset (coloured shapes, moving shapes, text; a trained tokenizer);
2. stage 1 (projector only) and stage 2 (everything) of the tiny Long-VITA at TP=2 over gloo,
   with the real training command, checkpoints and resume machinery;
3. convert the final checkpoint to the Hugging Face layout;
4. load it with transformers (AutoModelForCausalLM, no remote code) and answer the held-out
   questions about held-out images and videos: accuracy per question type next to chance;
5. write the loss curve of both stages as a PNG, with where stage 2 starts marked;
6. verify the export: transformers on the HF files vs megatron-core on the trained checkpoint,
   resharded to TP=2 x PP=2, on a held-out image and video. Its `verify:` line is the last line.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import time
from typing import Dict, List, Optional

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_recipes", "demo.yaml")


def _train_args(**flags) -> argparse.Namespace:
    from megatron_vita.training import config as train_config

    parser = argparse.ArgumentParser()
    train_config.add_arguments(parser)
    argv: List[str] = []
    for key, value in flags.items():
        if value is None or value is False:
            continue
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return parser.parse_args(argv)


def train_stage(stage: int, data: str, save: str, backend: str, **flags) -> List[Dict]:
    """One stage through `megatron-vita train`'s code path; returns its metrics lines."""
    from megatron_vita import platform
    from megatron_vita.training.cli import build_config
    from megatron_vita.training.loop import rank_main

    metrics = os.path.join(save, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    # The demo owns its output folder: a rerun saves over its previous checkpoints.
    cfg = build_config(_train_args(recipe=RECIPE, data_root=data, stage=stage, save=save, metrics_file=metrics,
                                   override_save=True, **flags))
    platform.spawn(rank_main, cfg.world_size, cfg, timeout=math.inf, backend=backend)
    with open(metrics, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def evaluate(hf_dir: str, data: str, max_new_tokens: int = 4, log=print,
             backend: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """Held-out accuracy of the exported HF model: exact match of the first generated word."""
    import torch
    from transformers import AutoModelForCausalLM

    import megatron_vita  # noqa: F401  (registers the Long-VITA classes)
    from megatron_vita.config import ModelConfig
    from megatron_vita.data.loader import RecordEvaluator
    from megatron_vita.data.recipe import load_recipe
    from megatron_vita.data.template import load_tokenizer

    from megatron_vita.platform import placement

    tokenizer = load_tokenizer(hf_dir)
    device = placement.device(backend)  # the exported model answers on the training's device
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval().to(device)
    model_config = ModelConfig.from_hf_dir(hf_dir)
    prompts = RecordEvaluator(load_recipe(RECIPE, data), tokenizer, model_config, data)
    with open(os.path.join(data, "heldout", "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    hits: Dict[str, List[bool]] = collections.defaultdict(list)
    examples = []
    with open(os.path.join(data, "heldout", "heldout.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    with torch.no_grad():
        for rec in records:
            ids, pixels, _ = prompts.prompt(rec)
            images = pixels.to(device) if pixels.shape[0] else None
            out = model.generate(torch.tensor([ids], device=device), images=images, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=model_config.tokens.eos_token_id,
                                 pad_token_id=model_config.tokens.pad_token_id)
            reply = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
            words = reply.split()
            hits[rec["qtype"]].append(bool(words) and words[0].strip(".,") == rec["answer"])
            if len(examples) < 6 and len(hits[rec["qtype"]]) == 1:
                examples.append((rec["qtype"], rec["answer"], reply))
    result = {}
    for qtype, got in sorted(hits.items()):
        result[qtype] = {"accuracy": sum(got) / len(got), "chance": meta["question_types"][qtype]["chance"],
                         "count": len(got)}
    total = sum(len(v) for v in hits.values())
    result["overall"] = {"accuracy": sum(sum(v) for v in hits.values()) / total,
                         "chance": sum(r["chance"] * r["count"] for k, r in result.items()) / total, "count": total}
    for qtype, answer, reply in examples:
        log(f"  e.g. {qtype:<7} answer {answer!r:<10} model {reply!r}")
    return result


def run_demo(out: str, tp: int = 2, stage1_iters: int = 30, stage2_iters: int = 400, seq_length: int = 1024,
             global_batch_size: int = 2, stage2_lr: float = 2e-3, data_scale: float = 4.0, seed: int = 0,
             backend: str = "cpu", log=print) -> Dict:
    from megatron_vita.checkpoint.convert import convert
    from megatron_vita.data.demo import make_demo
    from megatron_vita.training.monitor import plot_loss_curve

    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    data = os.path.join(out, "data")
    log(f"[demo] 1/6 synthetic data -> {data}")
    make_demo(data, seed=seed, scale=data_scale, overwrite=True)
    common = dict(tensor_model_parallel_size=tp, seq_length=seq_length, global_batch_size=global_batch_size,
                  num_workers=1, log_interval=25, seed=1234 + seed)
    log(f"[demo] 2/6 stage 1 (projector only), {stage1_iters} iterations at TP={tp}")
    s1 = train_stage(1, data, os.path.join(out, "stage1"), backend, train_iters=stage1_iters, **common)
    log(f"[demo] 3/6 stage 2 (all modules), {stage2_iters} iterations at TP={tp}, from stage 1")
    s2 = train_stage(2, data, os.path.join(out, "stage2"), backend, train_iters=stage2_iters, lr=stage2_lr,
                     min_lr=stage2_lr / 20, vision_lr_mult=1.0, vision_layer_decay=1.0,
                     load=os.path.join(out, "stage1"), finetune=True, **common)
    curve = os.path.join(out, "loss_curve.png")
    # Stage 2 restarts its iteration count (--finetune): drawn after stage 1 on one axis.
    offset = s1[-1]["iteration"]
    plot_loss_curve([(r["iteration"], r["loss"]) for r in s1] + [(offset + r["iteration"], r["loss"]) for r in s2],
                    curve, title="demo: lm loss of stage 1 (projector only), then stage 2 (all modules)",
                    stages=[(s1[0]["iteration"], "stage 1"), (offset + s2[0]["iteration"], "stage 2")])
    hf_dir = os.path.join(out, "hf")
    log(f"[demo] 4/6 convert stage 2 -> HF layout at {hf_dir}")
    convert(os.path.join(out, "stage2"), hf_dir, src_format="megatron", dst_format="hf", force=True,
            tokenizer=os.path.join(data, "tokenizer"), progress=False, log=lambda *a: None)
    log("[demo] 5/6 held-out questions on unseen images and videos (transformers, greedy)")
    result = evaluate(hf_dir, data, log=log, backend=backend)
    minutes = (time.perf_counter() - t0) / 60
    log(f"[demo] {'question':<8} {'accuracy':>9} {'chance':>7} {'n':>4}")
    for qtype, r in result.items():
        log(f"[demo] {qtype:<8} {100 * r['accuracy']:>8.1f}% {100 * r['chance']:>6.1f}% {r['count']:>4d}")
    log(f"[demo] loss: stage 1 {s1[0]['loss']:.3f} -> {s1[-1]['loss']:.3f}, stage 2 {s2[0]['loss']:.3f} -> "
        f"{s2[-1]['loss']:.3f}; curve {curve}")
    overall = result["overall"]
    log(f"[demo] done in {minutes:.1f} min: held-out accuracy {100 * overall['accuracy']:.1f}% vs chance "
        f"{100 * overall['chance']:.1f}%")
    summary = {"accuracy": result, "minutes": minutes, "loss_curve": curve, "hf": hf_dir}
    with open(os.path.join(out, "demo_result.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    log(f"[demo] 6/6 verify: HF export (transformers) vs the stage-2 checkpoint on megatron-core at TP={tp} x PP=2")
    summary["verify"] = verify_export(hf_dir, os.path.join(out, "stage2"), data, tp, backend, log)
    return summary


def verify_export(hf_dir: str, megatron_dir: str, data: str, tp: int, backend: str, log=print) -> Dict:
    from megatron_vita.checkpoint.verify import verify

    heldout = os.path.join(data, "heldout")
    with open(os.path.join(heldout, "heldout.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    image = next(os.path.join(data, r["images"][0]) for r in records if r.get("images"))
    video = next(os.path.join(data, r["videos"][0]) for r in records if r.get("videos"))
    return verify(hf_dir, tp=tp, pp=2, image=image, video=video, megatron_dir=megatron_dir, backend=backend, log=log)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="outputs/demo", help="output folder (data, checkpoints, HF model, PNG)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (gloo processes)")
    parser.add_argument("--stage1-iters", type=int, default=30)
    parser.add_argument("--stage2-iters", type=int, default=400)
    parser.add_argument("--seq-length", type=int, default=1024, help="packed sequence length")
    parser.add_argument("--global-batch-size", type=int, default=2)
    parser.add_argument("--stage2-lr", type=float, default=2e-3)
    parser.add_argument("--data-scale", type=float, default=4.0, help="size of the synthetic dataset")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    summary = run_demo(args.out, args.tp, args.stage1_iters, args.stage2_iters, args.seq_length,
                       args.global_batch_size, args.stage2_lr, args.data_scale, args.seed, backend=args.backend)
    return 0 if summary["verify"]["passed"] else 1
