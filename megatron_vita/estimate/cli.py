"""`megatron-vita estimate`: per-device memory of a training layout, before anything runs.

Owns the command line: Megatron's layout flags (and the short --tp / --pp / --cp / --dp), the
batch, precision, recompute and media, optionally a stage recipe whose `training:` section, model,
sequence length, stage and video frames are the defaults (flags override them, as in `train`:
the same merge, training.config.merge). The configuration is checked with training's rules before
anything is computed; every problem is one line naming the flag. Output: the table of terms of
the most loaded pipeline stage (a line per other stage), what is modelled and what is not, and
last `estimate: total=<GiB> GiB per device, fits|does not fit in <N> GiB`.
Only argparse at import time: --help costs no torch (nothing here ever imports it).
"""
from __future__ import annotations

import argparse
from typing import List, Optional

DEFAULT_DEVICE_GIB = 64.0  # an Ascend 910B (Long-VITA's nodes: 16 NPUs x 64 GB)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None,
                   help="stage recipe YAML: its model, seq_length, stage, video frames and training: layout are the "
                        "defaults (e.g. data_recipes/stage4.yaml)")
    p.add_argument("--model", default=None,
                   help="preset (long-vita-14b, tiny), HF checkpoint dir or config JSON (default: the recipe's, "
                        "else long-vita-14b)")
    p.add_argument("--seq-length", type=int, default=None, help="tokens per packed sequence (default: the recipe's)")
    g = p.add_argument_group("layout (Megatron's flags)")
    g.add_argument("--tp", "--tensor-model-parallel-size", dest="tensor_model_parallel_size", type=int, default=None,
                   metavar="N")
    g.add_argument("--pp", "--pipeline-model-parallel-size", dest="pipeline_model_parallel_size", type=int,
                   default=None, metavar="N")
    g.add_argument("--cp", "--context-parallel-size", dest="context_parallel_size", type=int, default=None, metavar="N")
    g.add_argument("--cp-algo", "--context-parallel-algo", dest="context_parallel_algo", default=None, metavar="ALGO",
                   help="ring (default), ulysses or hybrid (MindSpeed's names accepted)")
    g.add_argument("--ulysses-degree-in-cp", type=int, default=None, help="hybrid: Ulysses ranks per ring rank")
    g.add_argument("--sequence-parallel", action="store_true", default=None)
    g.add_argument("--use-distributed-optimizer", action="store_true", default=None,
                   help="shard Adam's state (and fp32 master weights) over DP x CP")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None, metavar="N")
    g.add_argument("--dp", "--data-parallel-size", dest="dp", type=int, default=1, help="data-parallel size")
    b = p.add_argument_group("batch, precision, recompute")
    b.add_argument("--micro-batch-size", type=int, default=None)
    b.add_argument("--global-batch-size", type=int, default=None,
                   help="with --dp: micro-batches per step (caps the pipeline's in-flight micro-batches)")
    b.add_argument("--bf16", dest="bf16", action="store_true", default=None, help="bf16 parameters and activations")
    b.add_argument("--fp32", dest="bf16", action="store_const", const=False, help="fp32 parameters and activations")
    b.add_argument("--recompute", "--recompute-granularity", dest="recompute_granularity", default=None, metavar="GRANULARITY",
                   help="full, selective or none")
    b.add_argument("--recompute-method", default=None, help="full recompute: uniform (default) or block")
    b.add_argument("--recompute-num-layers", type=int, default=None,
                   help="full recompute: layers per unit (uniform) or recomputed layers per stage (block); "
                        "default 1")
    m = p.add_argument_group("media, head, device")
    m.add_argument("--frames", type=int, default=None,
                   help="video frames in a sequence, one tile each (default: the recipe's max_frames that fit)")
    m.add_argument("--image-tiles", type=int, default=0, help="image tiles in a sequence (thumbnails included)")
    m.add_argument("--supervised-tokens", type=int, default=None,
                   help="labelled positions k per sequence: the logits-masked head computes k x V/TP logits "
                        "(default 4096, at most the sequence)")
    m.add_argument("--no-logits-mask", action="store_true", default=None, help="full S x V/TP logits")
    m.add_argument("--stage", type=int, default=None, choices=[1, 2, 3, 4],
                   help="which parts train (1: projector; 2: all; 3-4: LLM + projector); default: the recipe's, "
                        "else everything")
    m.add_argument("--device-memory", type=float, default=DEFAULT_DEVICE_GIB,
                   help=f"device memory in GiB for the verdict (default {DEFAULT_DEVICE_GIB:g})")


def build_inputs(args: argparse.Namespace):
    """EstimateInputs from flags over the recipe over the stage's defaults (training's merge)."""
    from megatron_vita.config.model import resolve_model_config
    from megatron_vita.estimate.inputs import EstimateInputs
    from megatron_vita.training import config as train_config

    recipe = None
    if args.recipe:
        from megatron_vita.data.recipe import load_recipe

        recipe = load_recipe(args.recipe)
    stage = args.stage if args.stage is not None else (recipe.stage if recipe else None)
    training = recipe.training if recipe else {}
    explicit_none = args.recompute_granularity == "none"
    flags = argparse.Namespace(**{k: v for k, v in vars(args).items()
                                  if k in train_config.FLAGS and k not in ("recipe", "model", "stage")})
    if explicit_none:
        flags.recompute_granularity = None
    cfg = train_config.merge(flags, training, recipe.path if recipe else "", train_config.stage_defaults(stage))
    model = resolve_model_config(args.model or (recipe.model if recipe else "long-vita-14b"))
    seq = args.seq_length or (recipe.seq_length if recipe else None)
    if seq is None:
        raise ValueError("--seq-length is needed (or --recipe with a seq_length)")
    gran, method, layers = cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers
    if explicit_none:
        gran = method = layers = None
    elif gran == "full":
        method, layers = method or "uniform", layers or 1
    from megatron_vita.config.parallel import ConfigError
    from megatron_vita.training.preflight import training_layout

    # The virtual pipeline from --num-layers-per-virtual-pipeline-stage, as training resolves it.
    par, problems = training_layout(cfg, model, cfg.parallel.model_parallel_size * max(args.dp, 1), seq)
    if any("virtual-pipeline" in p for p in problems):
        raise ConfigError([p for p in problems if "virtual-pipeline" in p])
    frames = args.frames
    if frames is None:
        # The recipe's longest video, as many of its frames as one sequence holds.
        frames = min(recipe.video.max_frames, seq // (model.num_image_token + 2)) if recipe else 0
    return EstimateInputs(
        model=model, parallel=par, seq_length=seq, data_parallel_size=args.dp,
        micro_batch_size=cfg.micro_batch_size,
        global_batch_size=args.global_batch_size if args.global_batch_size is not None else
        (cfg.global_batch_size if any(str(k).replace("_", "-") == "global-batch-size" for k in training) else None),
        bf16=bool(cfg.bf16), recompute_granularity=gran, recompute_method=method, recompute_num_layers=layers,
        frames=frames, image_tiles=args.image_tiles,
        supervised_tokens=args.supervised_tokens,
        logits_mask=not cfg.no_logits_mask, train_vision=not cfg.freeze_vision,
        train_projector=not cfg.freeze_projector, train_language=not cfg.freeze_language,
        device_memory_gib=args.device_memory)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def report(est) -> List[str]:
    """The printed lines; the last one is the verdict."""
    from megatron_vita.estimate.core import MODELLED, NOT_MODELLED, tiles_per_rank

    i, par = est.inputs, est.inputs.parallel
    trained = [n for n, on in (("ViT", i.train_vision), ("projector", i.train_projector), ("LLM", i.train_language))
               if on]
    recompute = i.recompute_granularity or "none"
    if i.recompute_granularity == "full":
        recompute += f" ({i.recompute_method}, {i.recompute_num_layers} layer(s))"
    lines = [
        f"model {i.model.name}: {i.model.language.num_layers} LLM layers, hidden {i.model.language.hidden_size}; "
        f"trains {', '.join(trained) or 'nothing'}",
        f"layout {par.describe()} DP{i.data_parallel_size}"
        f"{' dist-opt' if par.use_distributed_optimizer else ''}, {'bf16' if i.bf16 else 'fp32'}, "
        f"seq {i.seq_length} ({i.seq_length // par.cp} per CP rank), micro-batch {i.micro_batch_size}, "
        f"recompute {recompute}",
        f"media {i.frames} frame(s) + {i.image_tiles} image tile(s) ({tiles_per_rank(i)} per CP rank); "
        f"head {'logits-masked, k=' + str(i.supervised) if i.logits_mask else 'full logits'}",
        "",
    ]
    peak = est.peak_stage
    lines.append(f"pipeline stage {peak.pp_rank} (the largest of {len(est.stages)}):")
    lines.append(f"  {'term':<17} {'GiB':>9}  detail")
    for t in peak.terms:
        lines.append(f"  {t.name:<17} {_gib(t.bytes):>9}  {t.detail}")
    lines.append(f"  {'total':<17} {_gib(peak.total):>9}")
    for st in est.stages:
        if st is not peak:
            lines.append(f"pipeline stage {st.pp_rank}: total {_gib(st.total)} GiB")
    lines.append("modelled: " + "; ".join(MODELLED))
    lines.append("not modelled: " + "; ".join(NOT_MODELLED))
    verdict = "fits" if est.fits else "does not fit"
    lines.append(f"estimate: total={_gib(est.total)} GiB per device, {verdict} in {i.device_memory_gib:g} GiB")
    return lines


def run(args: argparse.Namespace) -> Optional[int]:
    from megatron_vita.estimate.core import estimate

    inputs = build_inputs(args)
    inputs.validate()  # ConfigError: one line per problem, printed by the CLI before anything is computed
    for line in report(estimate(inputs)):
        print(line)
    return 0
