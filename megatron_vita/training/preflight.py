"""Checks of a whole training configuration, made before any rank starts.

`megatron-vita train` runs `check(cfg, world_size)` before it spawns ranks, and so does every
torchrun process before it joins the process group. It collects every problem it can see from
the launcher, and raises one ConfigError listing them, one line each naming the flag or file:

- the kernel flags (`--use-flash-attn`, `--use-fused-rmsnorm`, ...) against the backend
  (platform.features: on cpu only against the tests' torch_npu emulation, on cuda only the
  flash-attn one, with flash_attn importable);
- flag values: iterations, batch sizes (and how the global batch splits over data-parallel
  ranks), learning rates and optimizer constants, recompute settings, the sequence length (the
  bound a recipe's `seq_length` obeys);
- the parallel layout against the model's sizes and the world size (heads and KV groups per TP
  rank, layers per pipeline chunk, VPP, context parallelism: heads per rank, sequence multiple);
- paths: `--save`, `--tensorboard-dir`, `--metrics-file`, `--loss-curve` and `--export-hf` must
  be writable now rather than at the first save; `--save` must not silently write over another
  run's checkpoints;
- what is loaded: the tokenizer against the model, `--init-hf` / `--init-llm` / `--init-vit`
  (index and headers read, pickles refused), `--load`'s iteration (every file its metadata
  names present, the layout change and optimizer state compatible), and the data: the recipe's
  stream must fill a first packed sequence (data.loader.check_data).

A training run that passes these still reads data and builds the model in its ranks; what
fails there is a defect of the code, not of the configuration.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from typing import List, Optional, Tuple

from megatron_vita.config.model import ModelConfig
from megatron_vita.config.parallel import ConfigError, ParallelConfig
from megatron_vita.training.config import TrainConfig, to_namespace

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


def launch_world_size(cfg: TrainConfig) -> int:
    """Ranks the run will have: torchrun's WORLD_SIZE, else what `train` spawns."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return cfg.world_size


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def number_problems(cfg: TrainConfig) -> List[str]:
    """Flag values that cannot work whatever the model and data."""
    out: List[str] = []

    def at_least(name: str, low: int, optional: bool = False) -> None:
        value = cfg.flag(name)
        if (value is None and optional) or (value is not None and value >= low):
            return
        out.append(f"{_flag(name)} {value}: expected an integer >= {low}")

    def finite(name: str, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False,
               optional: bool = False) -> None:
        value = cfg.flag(name)
        if value is None and optional:
            return
        ok = value is not None and math.isfinite(value) and (value > low if low_open else value >= low) and \
            (value < high if high_open else value <= high)
        if not ok:
            if math.isinf(high):
                want = f"{'>' if low_open else '>='} {low:g}"
            else:
                want = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            out.append(f"{_flag(name)} {value}: expected a finite number {want}")

    for name in ("train_iters", "micro_batch_size", "global_batch_size", "log_interval"):
        at_least(name, 1)
    for name in ("save_interval", "nproc_per_node", "recompute_num_layers", "load_iteration",
                 "num_layers_per_virtual_pipeline_stage", "decoder_first_pipeline_num_layers",
                 "decoder_last_pipeline_num_layers"):
        at_least(name, 1, optional=True)
    at_least("num_workers", 0)
    at_least("make_vocab_size_divisible_by", 1)
    finite("lr", 0.0)
    finite("min_lr", 0.0, optional=True)
    lr, min_lr = cfg.optim.lr, cfg.optim.min_lr
    if min_lr is not None and lr is not None and math.isfinite(lr) and min_lr > lr >= 0:
        out.append(f"--min-lr {min_lr}: larger than --lr {lr} (the schedule decays from --lr to --min-lr)")
    finite("lr_warmup_fraction", 0.0, 1.0)
    finite("weight_decay", 0.0)
    finite("adam_beta1", 0.0, 1.0, high_open=True)
    finite("adam_beta2", 0.0, 1.0, high_open=True)
    finite("adam_eps", 0.0, low_open=True)
    finite("clip_grad", 0.0)
    finite("vision_lr_mult", 0.0, optional=True)
    finite("vision_layer_decay", 0.0, low_open=True, optional=True)
    if cfg.optim.lr_decay_style not in LR_DECAY_STYLES:
        out.append(f"--lr-decay-style {cfg.optim.lr_decay_style!r}: expected one of {', '.join(LR_DECAY_STYLES)}")
    if cfg.seq_length is not None:
        from megatron_vita.data.recipe import check_seq_length

        try:
            check_seq_length(cfg.seq_length, "--seq-length")
        except ValueError as e:
            out.append(str(e))
    out += _recompute_problems(cfg)
    return out


def _recompute_problems(cfg: TrainConfig) -> List[str]:
    # megatron-core's TransformerConfig asserts these inside every rank.
    gran, method, layers = cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers
    if gran is None:
        extra = [f for f, v in (("--recompute-method", method), ("--recompute-num-layers", layers)) if v is not None]
        return [f"{', '.join(extra)} needs --recompute-granularity full"] if extra else []
    if gran not in ("full", "selective"):
        return [f"--recompute-granularity {gran!r}: expected full or selective"]
    if gran == "selective":
        extra = [f for f, v in (("--recompute-method", method), ("--recompute-num-layers", layers)) if v is not None]
        return [f"{', '.join(extra)}: not used with --recompute-granularity selective"] if extra else []
    out = []
    if method is None:
        out.append("--recompute-granularity full needs --recompute-method uniform or block")
    elif method not in ("uniform", "block"):
        out.append(f"--recompute-method {method!r}: expected uniform or block")
    if layers is None:
        out.append("--recompute-granularity full needs --recompute-num-layers (layers per recompute unit)")
    return out


def combination_problems(cfg: TrainConfig) -> List[str]:
    """Flags that need or exclude each other."""
    out = []
    for flag, value, needs, present in (
            ("--save-interval", cfg.save_interval, "--save", cfg.save),
            ("--export-hf", cfg.export_hf, "--save (the HF export is converted from the saved checkpoint)", cfg.save),
            ("--finetune", cfg.finetune, "--load", cfg.load),
            ("--load-iteration", cfg.load_iteration, "--load", cfg.load),
            ("--override-save", cfg.override_save, "--save", cfg.save)):
        if value and not present:
            out.append(f"{flag} needs {needs}")
    if bool(cfg.init_llm) != bool(cfg.init_vit):
        out.append("--init-llm and --init-vit go together (the LLM and the ViT of stage 1)")
    if cfg.init_hf and (cfg.init_llm or cfg.init_vit):
        out.append("--init-hf and --init-llm/--init-vit are alternatives: give one")
    return out


# ---------------------------------------------------------------------------------------- paths


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def _can_create_in(directory: str) -> Optional[str]:
    """None if a file can be created in `directory` now (tried, not guessed: root ignores modes)."""
    try:
        probe = tempfile.mkdtemp(prefix=".megatron-vita-write-check-", dir=directory)
    except OSError as e:
        return f"cannot write in {directory} ({e.strerror or e})"
    os.rmdir(probe)
    return None


def writable_dir_problem(flag: str, path: str, named: Optional[str] = None) -> Optional[str]:
    """Why `path` cannot be (created as) a writable directory, or None (`named`: the path the message names)."""
    named = named or path
    if os.path.exists(path) and not os.path.isdir(path):
        what = "exists and is not a directory" if named == path else f"{path} is not a directory"
        return f"{flag} {named}: {what}"
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        return f"{flag} {named}: {base} is not a directory"
    why = _can_create_in(base)
    return f"{flag} {named}: {why}" if why else None


def writable_file_problem(flag: str, path: str) -> Optional[str]:
    """Why `path` cannot be written (appended to, or created) as a file, or None."""
    if os.path.isdir(path):
        return f"{flag} {path}: is a directory, expected a file path"
    if os.path.exists(path):
        try:
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as e:
            return f"{flag} {path}: cannot write ({e.strerror or e})"
        return None
    return writable_dir_problem(flag, os.path.dirname(os.path.abspath(path)), named=path)


def _holds_checkpoints(root: str) -> Optional[str]:
    """What in `root` belongs to a run's checkpoints (tracker or iter_* directories), or None."""
    from megatron_vita.checkpoint.megatron_layout import TRACKER, saved_iterations

    if not os.path.isdir(root):
        return None
    iterations = saved_iterations(root)
    if os.path.isfile(os.path.join(root, TRACKER)):
        text = open(os.path.join(root, TRACKER), encoding="utf-8").read().strip()[:20]
        return f"{TRACKER} names iteration {text}" + (f"; iterations {iterations}" if iterations else "")
    return f"iterations {iterations}" if iterations else None


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def path_problems(cfg: TrainConfig) -> List[str]:
    out = []
    for flag, path in (("--save", cfg.save), ("--tensorboard-dir", cfg.tensorboard_dir),
                       ("--export-hf", cfg.export_hf)):
        if path:
            why = writable_dir_problem(flag, path)
            if why:
                out.append(why)
    for flag, path in (("--metrics-file", cfg.metrics_file), ("--loss-curve", cfg.loss_curve)):
        if path:
            why = writable_file_problem(flag, path)
            if why:
                out.append(why)
    for flag, path in (("--load", cfg.load), ("--init-hf", cfg.init_hf), ("--init-llm", cfg.init_llm),
                       ("--init-vit", cfg.init_vit), ("--data-root", cfg.data_root)):
        if path and not os.path.isdir(path):
            out.append(f"{flag} {path}: not a directory")
        elif path and not os.access(path, os.R_OK | os.X_OK):
            out.append(f"{flag} {path}: not readable")
    if cfg.save and not cfg.override_save:
        held = _holds_checkpoints(cfg.save)
        continues = cfg.load and _same_dir(cfg.load, cfg.save) and not cfg.finetune
        if held and not continues:
            out.append(f"--save {cfg.save}: already holds checkpoints of another run ({held}); this run would "
                       f"overwrite them: add --load {cfg.save} to continue that run, choose another --save, or add "
                       "--override-save to save over them")
    if cfg.export_hf and os.path.isdir(cfg.export_hf) and os.listdir(cfg.export_hf) and \
            not os.path.isfile(os.path.join(cfg.export_hf, "config.json")):
        out.append(f"--export-hf {cfg.export_hf}: a non-empty directory that is not an HF checkpoint "
                   "(the export replaces its contents); choose an empty or new directory")
    return out


# -------------------------------------------------------------------------------- model and layout


def training_layout(cfg: TrainConfig, model_config, world_size: int,
                    seq_length: Optional[int] = None) -> Tuple[ParallelConfig, List[str]]:
    """The run's ParallelConfig (cfg.parallel with VPP resolved from --num-layers-per-virtual-pipeline-stage)
    and its problems (context parallelism: heads per rank for the algorithm, the sequence length's multiple)."""
    par = cfg.parallel
    problems: List[str] = []
    per_vchunk = cfg.num_layers_per_virtual_pipeline_stage
    if per_vchunk and par.pp >= 1:
        per_rank = model_config.language.num_layers // par.pp
        if per_vchunk < 1 or per_rank % per_vchunk or per_rank // per_vchunk < 1:
            problems.append(f"--num-layers-per-virtual-pipeline-stage {per_vchunk} does not divide the {per_rank} "
                            f"LLM layers per pipeline stage (--pipeline-model-parallel-size {par.pp})")
        else:
            par = dataclasses.replace(par, virtual_pipeline_model_parallel_size=per_rank // per_vchunk)
    problems += par.problems(model_config, world_size, seq_length)
    layers = cfg.recompute_num_layers
    if layers and cfg.recompute_granularity == "full" and par.pp >= 1 and \
            layers > model_config.language.num_layers // par.pp:
        problems.append(f"--recompute-num-layers {layers}: more than the {model_config.language.num_layers // par.pp} "
                        "LLM layers per pipeline stage")
    return par, problems


def resolve_model(cfg: TrainConfig, recipe, tokenizer) -> ModelConfig:
    """Model sizes from --model / --init-hf / the recipe, with token ids taken from the tokenizer."""
    from megatron_vita.config import resolve_model_config
    from megatron_vita.data.template import token_ids_from_tokenizer

    spec = cfg.init_hf or cfg.model or recipe.model
    model = resolve_model_config(spec)
    tokens = token_ids_from_tokenizer(tokenizer)
    if len(tokenizer) > model.language.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than model '{spec}' has embeddings "
                         f"({model.language.vocab_size})")
    if cfg.init_hf and tokens != model.tokens:
        raise ValueError(f"--init-hf {cfg.init_hf}: its special-token ids differ from the tokenizer's "
                         f"({model.tokens.special} vs {tokens.special}); train with the tokenizer it was made for")
    model.tokens = tokens
    return model.validate()


def run_layout(cfg: TrainConfig, model_config, world_size: int, seq_length: Optional[int] = None) -> ParallelConfig:
    """training_layout for a run about to build its model: ConfigError (every problem) unless it fits."""
    par, problems = training_layout(cfg, model_config, world_size, seq_length)
    if problems:
        raise ConfigError(problems)
    return par


def batch_problems(cfg: TrainConfig, par: ParallelConfig, world_size: int) -> List[str]:
    if cfg.micro_batch_size < 1 or cfg.global_batch_size < 1 or par.model_parallel_size < 1 or \
            world_size % par.model_parallel_size:
        return []  # reported as a flag or layout problem
    dp = world_size // par.model_parallel_size
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        return [f"--global-batch-size {cfg.global_batch_size}: not a multiple of --micro-batch-size "
                f"{cfg.micro_batch_size} x data-parallel size {dp} (world size {world_size} / TP*PP*CP "
                f"{par.model_parallel_size})"]
    return []


def _one_line(flag: str, path: str, e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if text.startswith(flag):
        return text
    return f"{flag}: {text}" if path in text else f"{flag} {path}: {text}"


def init_problems(cfg: TrainConfig, model_config) -> List[str]:
    """Open the initial weights: index and safetensors headers (no tensor data), .bin files through the
    weights-only loader (a pickle that would run code is refused); --init-hf's names and shapes checked."""
    from megatron_vita.checkpoint.hf_format import HFSource

    out = []
    sources = [("--init-hf", cfg.init_hf, True)] if cfg.init_hf else []
    if cfg.init_llm and cfg.init_vit:
        sources += [("--init-llm", cfg.init_llm, False), ("--init-vit", cfg.init_vit, False)]
    for flag, path, whole_model in sources:
        if not os.path.isdir(path):
            continue  # already reported by path_problems
        try:
            source = HFSource(path, model_config)
            try:
                if whole_model:
                    source.check()
            finally:
                source.close()
        except (OSError, ValueError, RuntimeError, KeyError, EOFError) as e:
            out.append(_one_line(flag, path, e))
    return out


def load_problems(cfg: TrainConfig) -> List[str]:
    """--load's iteration complete and loadable into this layout (its pickles read safely)."""
    if not cfg.load or not os.path.isdir(cfg.load):
        return []
    from megatron_vita.training.checkpointing import check_resume_layout  # megatron-core: only with --load

    try:
        check_resume_layout(cfg.load, to_namespace(cfg), load_optim=not (cfg.no_load_optim or cfg.finetune),
                            iteration=cfg.load_iteration)
    except (OSError, ValueError, RuntimeError, EOFError) as e:
        return [_one_line("--load", cfg.load, e)]
    return []


def model_problems(cfg: TrainConfig, recipe, world_size: int) -> List[str]:
    """Tokenizer, model sizes, layout, batch split, initial weights and the checkpoint to load."""
    from megatron_vita.data.template import load_tokenizer

    out: List[str] = []
    tokenizer_path = cfg.tokenizer or recipe.resolve(cfg.data_root, recipe.tokenizer or "tokenizer")
    model_config = tokenizer = None
    if not os.path.isdir(tokenizer_path):
        flag = "--tokenizer" if cfg.tokenizer else f"the tokenizer of {recipe.path} under --data-root"
        out.append(f"{flag} {tokenizer_path}: not a directory")
    elif not (cfg.init_hf and not os.path.isdir(cfg.init_hf)):
        try:
            tokenizer = load_tokenizer(tokenizer_path)
            model_config = resolve_model(cfg, recipe, tokenizer)
        except (OSError, ValueError, KeyError) as e:
            out.append(_one_line("--model", str(cfg.model or cfg.init_hf or recipe.model), e))
    if model_config is not None:
        par, layout = training_layout(cfg, model_config, world_size, cfg.seq_length or recipe.seq_length)
        out += layout
        out += batch_problems(cfg, par, world_size)
        out += init_problems(cfg, model_config)
        out += data_problems(cfg, recipe, tokenizer, model_config)
    out += load_problems(cfg)
    return out


def data_problems(cfg: TrainConfig, recipe, tokenizer, model_config) -> List[str]:
    """The stream fills a first packed sequence at this run's --seq-length (no usable record, or every
    document longer than the sequence, is found here in seconds rather than by the ranks)."""
    from megatron_vita.data.loader import check_data
    from megatron_vita.data.recipe import MIN_SEQ_LENGTH

    if cfg.seq_length is not None and not (isinstance(cfg.seq_length, int) and cfg.seq_length >= MIN_SEQ_LENGTH):
        return []  # reported as a flag problem
    run_recipe = dataclasses.replace(recipe, seq_length=cfg.seq_length or recipe.seq_length)
    try:
        check_data(run_recipe, tokenizer=tokenizer, model_config=model_config, data_root=cfg.data_root,
                   seed=cfg.seed)
    except RuntimeError as e:
        text = str(e).strip().splitlines()[0]
        if cfg.seq_length is not None and "longer than the sequence length" in text:
            return [f"--seq-length {cfg.seq_length}: {text}"]
        return [f"--recipe {recipe.path} (--data-root {cfg.data_root}): {text}"]
    return []


def feature_problems(cfg: TrainConfig, backend: Optional[str] = None) -> List[str]:
    """The kernel flags this backend cannot run (default backend: --backend / $MEGATRON_VITA_BACKEND / auto)."""
    if not cfg.features:
        return []
    from megatron_vita.platform.features import feature_problems as problems_on
    from megatron_vita.platform import resolve_backend

    return problems_on(resolve_backend(backend), cfg.features, "bf16" if cfg.bf16 else "fp32")


def check(cfg: TrainConfig, recipe, world_size: int, backend: Optional[str] = None) -> None:
    """Raise ConfigError naming every problem of this run's configuration (one line each)."""
    problems = number_problems(cfg) + combination_problems(cfg) + feature_problems(cfg, backend) + \
        path_problems(cfg) + model_problems(cfg, recipe, world_size)
    if problems:
        raise ConfigError(problems)
