"""Training configuration: Megatron-style flags, a recipe's `training:` section, stage defaults.

One table (`FLAGS`) declares every training option once: its Megatron flag, type and help. The
same table builds the argparse parser and validates a recipe's `training:` mapping (keys are
the flag names, with - or _), so a recipe can set anything a flag can. Precedence: command-line
flag > recipe `training:` > the stage's defaults (Long-VITA's recipe) > the built-in default.

The table is derived from the dataclasses: every TrainConfig field is a flag, except the three
members that group options for their users, whose fields become flags through one mapping each:
`parallel` (a ParallelConfig: `PARALLEL_FLAGS` maps Megatron's flag names to its fields),
`optim` (an OptimConfig: its fields are the flags' names) and `features` (the kernel flags
switched on, MindSpeed's names: `--use-flash-attn`, `--use-fused-rmsnorm`, ... one boolean flag
per name of `config.features.known_feature_names()`; every rank's platform.activate applies them). `TrainConfig.from_flags` builds a
config from flag names, `TrainConfig.flag` reads one back, and `to_namespace` gives the flat
Megatron `args` stored in checkpoints.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

from megatron_vita.config.features import add_feature_arguments, known_feature_names
from megatron_vita.config.parallel import ParallelConfig


@dataclass
class OptimConfig:
    """Adam and its LR schedule: linear warmup from 0, then decay to min_lr (Megatron's flag names)."""

    lr: Optional[float] = None  # peak; None until a flag, the recipe or the stage sets it
    min_lr: float = 0.0
    lr_warmup_fraction: float = 0.03
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


# Megatron flag -> ParallelConfig field: the one place the layout flags are translated. The virtual
# pipeline is given as --num-layers-per-virtual-pipeline-stage (a TrainConfig field), which becomes
# ParallelConfig's VPP once the model's layer count is known (preflight.training_layout).
PARALLEL_FLAGS: Dict[str, str] = {
    "tensor_model_parallel_size": "tensor_model_parallel_size",
    "pipeline_model_parallel_size": "pipeline_model_parallel_size",
    "context_parallel_size": "context_parallel_size",
    "context_parallel_algo": "context_parallel_algo",
    "ulysses_degree_in_cp": "ulysses_degree_in_cp",
    "use_cp_send_recv_overlap": "cp_send_recv_overlap",
    "sequence_parallel": "sequence_parallel",
    "use_distributed_optimizer": "use_distributed_optimizer",
    "decoder_first_pipeline_num_layers": "num_layers_in_first_pipeline_stage",
    "decoder_last_pipeline_num_layers": "num_layers_in_last_pipeline_stage",
    "make_vocab_size_divisible_by": "make_vocab_size_divisible_by",
}


@dataclass
class TrainConfig:
    # What to train on
    recipe: str = ""
    data_root: str = "."
    stage: Optional[int] = None
    model: Optional[str] = None  # preset name or HF dir (default: the recipe's model)
    tokenizer: Optional[str] = None
    init_hf: Optional[str] = None  # start from an HF checkpoint, converted on the fly
    init_llm: Optional[str] = None  # or from separate parts: a Qwen2 HF dir ...
    init_vit: Optional[str] = None  # ... and an InternViT-300M HF dir (projector from scratch)
    # Parallel layout (flags: PARALLEL_FLAGS)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    # Batch
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: Optional[int] = None  # default: the recipe's
    # Optimizer and schedule (flags: OptimConfig's fields)
    optim: OptimConfig = field(default_factory=OptimConfig)
    vision_lr_mult: Optional[float] = None
    vision_layer_decay: Optional[float] = None
    train_iters: int = 100
    seed: int = 1234
    bf16: bool = False
    no_logits_mask: bool = False
    # Megatron-LM's flag: initialise parameters on the host, then move them (the CPU backend's
    # TP-independent init on any device); default: directly on the device, as Megatron-LM does
    use_cpu_initialization: bool = False
    # Memory
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    # Kernel flags switched on (flags: one per name, see the module docstring)
    features: Tuple[str, ...] = ()
    # Checkpoints
    save: Optional[str] = None
    load: Optional[str] = None
    load_iteration: Optional[int] = None  # default: the iteration latest_checkpointed_iteration.txt names
    override_save: bool = False
    save_interval: Optional[int] = None
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    export_hf: Optional[str] = None
    # Logging and data loading
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    metrics_file: Optional[str] = None
    loss_curve: Optional[str] = None
    num_workers: int = 2
    nproc_per_node: Optional[int] = None
    # Which modules train (default: the stage's)
    freeze_vision: Optional[bool] = None
    freeze_projector: Optional[bool] = None
    freeze_language: Optional[bool] = None

    @classmethod
    def from_flags(cls, **values: Any) -> "TrainConfig":
        """A config from option values keyed by flag name (tensor_model_parallel_size, lr, ...)."""
        own: Dict[str, Any] = {}
        members: Dict[str, Dict[str, Any]] = {"parallel": {}, "optim": {}, "features": {}}
        for name, value in values.items():
            if name not in FLAGS:
                raise TypeError(f"unknown training option '{name}'")
            flag = FLAGS[name]
            (members[flag.member] if flag.member else own)[flag.attr] = value
        features = tuple(f for f in known_feature_names() if members["features"].get(f))
        return cls(**own, parallel=ParallelConfig(**members["parallel"]), optim=OptimConfig(**members["optim"]),
                   features=features)

    def flag(self, name: str) -> Any:
        """The value of the option with this flag name."""
        flag = FLAGS[name]
        if flag.member == "features":
            return flag.attr in self.features
        return getattr(getattr(self, flag.member) if flag.member else self, flag.attr)

    @property
    def world_size(self) -> int:
        return self.nproc_per_node or self.parallel.model_parallel_size


@dataclass(frozen=True)
class Flag:
    """One training option: `--name` on the command line, `name` in a recipe; held at
    TrainConfig.<attr>, or TrainConfig.<member>.<attr>."""

    name: str
    member: Optional[str]  # None, "parallel" or "optim"
    attr: str
    type: str  # as the dataclass declares it: "int", "Optional[float]", "bool", ...


def _flag_table() -> Dict[str, Flag]:
    table: Dict[str, Flag] = {}
    member_fields = {"parallel": {f.name: f for f in fields(ParallelConfig)},
                     "optim": {f.name: f for f in fields(OptimConfig)}}
    for f in fields(TrainConfig):
        if f.name == "parallel":
            for name, attr in PARALLEL_FLAGS.items():
                table[name] = Flag(name, "parallel", attr, str(member_fields["parallel"][attr].type))
        elif f.name == "optim":
            for name, g in member_fields["optim"].items():
                table[name] = Flag(name, "optim", name, str(g.type))
        elif f.name == "features":
            for feature in known_feature_names():
                name = feature.replace("-", "_")
                table[name] = Flag(name, "features", feature, "bool")
        else:
            table[f.name] = Flag(f.name, None, f.name, str(f.type))
    return table


FLAGS: Dict[str, Flag] = _flag_table()


HELP: Dict[str, str] = {
    "recipe": "stage recipe YAML (data_recipes/stageN.yaml or demo.yaml)",
    "data_root": "folder the recipe's JSONL paths (and tokenizer) are relative to",
    "stage": "Long-VITA stage 1-4: which modules train and the LR defaults (default: the recipe's)",
    "model": "model preset (tiny, long-vita-14b) or HF checkpoint dir for sizes (default: the recipe's)",
    "tokenizer": "HF tokenizer dir (default: the recipe's, under --data-root)",
    "init_hf": "initialise weights from a Long-VITA HF checkpoint (converted on the fly)",
    "init_llm": "stage 1 from parts: the Qwen2.5 HF checkpoint (with --init-vit; projector starts fresh)",
    "init_vit": "stage 1 from parts: the InternViT-300M-448px HF checkpoint (with --init-llm)",
    "num_layers_per_virtual_pipeline_stage": "LLM layers per virtual pipeline chunk (interleaved 1F1B)",
    "decoder_first_pipeline_num_layers": "LLM layers on the first pipeline stage (uneven split)",
    "decoder_last_pipeline_num_layers": "LLM layers on the last pipeline stage (uneven split)",
    "context_parallel_size": "ranks each sequence is split over (context parallelism; stage 3: 2, stage 4: 8)",
    "context_parallel_algo": "ring (default; MindSpeed megatron_cp_algo), ulysses (ulysses_cp_algo) or hybrid "
                             "(hybrid_cp_algo: Ulysses groups inside ring groups)",
    "ulysses_degree_in_cp": "hybrid: ranks per Ulysses group inside the CP group (divides "
                            "--context-parallel-size, leaves >= 2 ring ranks, divides the query heads per TP rank)",
    "use_cp_send_recv_overlap": "ring: post the next KV block's send/recv before computing the current one (on by "
                                "default; `use_cp_send_recv_overlap: false` in the recipe turns it off)",
    "global_batch_size": "sequences per optimizer step over all data-parallel ranks",
    "seq_length": "packed sequence length (default: the recipe's seq_length)",
    "lr": "peak learning rate (default: the stage's)",
    "min_lr": "final learning rate of the cosine decay (default: the stage's)",
    "lr_warmup_fraction": "fraction of --train-iters spent in linear warmup",
    "vision_lr_mult": "ViT learning-rate multiplier (stage 2: 0.1)",
    "vision_layer_decay": "ViT layer-wise LR decay d: layer l gets d^(L+1-l) (stage 2: 0.9)",
    "no_logits_mask": "compute full logits in training instead of the logits-masked head",
    "use_cpu_initialization": "initialise parameters on the host and move them to the device (the same weights as "
                              "the CPU backend for a seed, at any TP); default: directly on the device",
    "save": "checkpoint directory (iter_XXXXXXX/ + latest_checkpointed_iteration.txt); one that already holds "
            "another run's checkpoints needs --load on it (to continue) or --override-save",
    "load": "resume from this checkpoint directory (model, optimizer, scheduler, RNG, data order, consumed samples)",
    "load_iteration": "with --load: the iteration to load (default: the one latest_checkpointed_iteration.txt "
                      "names); also --ckpt-step as in Megatron-LM",
    "override_save": "let --save write into a directory that holds another run's checkpoints (without it that is "
                     "refused unless --load names the same directory): its iterations are replaced as this run "
                     "saves and latest_checkpointed_iteration.txt then names this run's",
    "finetune": "with --load: take only the model weights and start at iteration 0",
    "export_hf": "after the last save, write the model in the HF layout to this directory (needs --save; under "
                 "torchrun rank 0 writes it after every rank finished)",
    "metrics_file": "JSON lines, one per iteration (loss, lr, grad norm, samples)",
    "loss_curve": "PNG of the loss curve written at the end (default: <save>/loss_curve.png)",
    "num_workers": "DataLoader workers per rank",
    "nproc_per_node": "ranks to spawn when not launched by torchrun (default: TP*PP*CP)",
}

# Other spellings of a flag (Megatron-LM's names).
ALIASES: Dict[str, List[str]] = {"load_iteration": ["--ckpt-step"]}
BOOL_FLAGS = {f.name for f in FLAGS.values() if f.type in ("bool", "Optional[bool]")}
STAGE_OWNED = {"lr", "min_lr", "vision_lr_mult", "vision_layer_decay", "freeze_vision", "freeze_projector",
               "freeze_language"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of FLAGS as a Megatron-style flag; defaults stay None so sources can merge."""
    types = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float,
             "Optional[str]": str}
    for f in FLAGS.values():
        if f.member == "features":
            continue  # added below by the features themselves (their help, any options of their own)
        help_text = HELP.get(f.name, "")
        names = [_flag(f.name), *ALIASES.get(f.name, [])]
        if f.name in BOOL_FLAGS:
            parser.add_argument(*names, dest=f.name, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(*names, dest=f.name, type=types[f.type], default=None,
                                required=f.name == "recipe", help=help_text or None)
    add_feature_arguments(parser)


def _coerce(name: str, value: Any, where: str) -> Any:
    f = FLAGS.get(name)
    if f is None:
        known = ", ".join(sorted(_flag(x)[2:] for x in FLAGS))
        raise ValueError(f"{where}: unknown training option '{name}' (known: {known})")
    kind = f.type.replace("Optional[", "").rstrip("]")
    if value is None:
        return None
    try:
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        return {"int": int, "float": float, "str": str}[kind](value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: training option '{name}' expects {kind}, got {value!r}") from None


def merge(cli: argparse.Namespace, recipe_training: Dict[str, Any], recipe_path: str,
          stage_defaults: Dict[str, Any]) -> TrainConfig:
    """flag > recipe training: > stage defaults > dataclass default."""
    values: Dict[str, Any] = {}
    for key, value in (recipe_training or {}).items():
        name = str(key).replace("-", "_")
        line = getattr(recipe_training, "key_lines", {}).get(key)
        values[name] = _coerce(name, value, f"{recipe_path}:{line}" if line else recipe_path)
    for name, value in stage_defaults.items():
        values.setdefault(name, value)
    for name, flag in FLAGS.items():
        flag_value = getattr(cli, name, None)
        if flag.member == "features" and flag_value is False:
            continue  # a kernel flag not given on the command line (its parser default) leaves the recipe's
        if flag_value is not None:
            values[name] = flag_value
    return TrainConfig.from_flags(**{k: v for k, v in values.items() if v is not None})


def to_namespace(cfg: TrainConfig) -> argparse.Namespace:
    """The Megatron-style `args` Namespace stored in checkpoints: every option under its flag name."""
    return argparse.Namespace(**{name: cfg.flag(name) for name in FLAGS})


def flags_of(cfg: TrainConfig, names: List[str]) -> List[str]:
    """Command-line flags reproducing the given fields (for spawning ranks or printing a launch line)."""
    out: List[str] = []
    for name in names:
        value = cfg.flag(name)
        if value is None or value is False:
            continue
        out += [_flag(name)] if value is True else [_flag(name), str(value)]
    return out


@dataclass
class StageSpec:
    """What Long-VITA's stage N trains, and its learning rates."""

    train_vision: bool
    train_projector: bool
    train_language: bool
    lr: float
    min_lr: float
    vision_lr_mult: float = 1.0
    vision_layer_decay: float = 1.0
    notes: List[str] = field(default_factory=list)

    def defaults(self) -> Dict[str, Any]:
        return {"lr": self.lr, "min_lr": self.min_lr, "vision_lr_mult": self.vision_lr_mult,
                "vision_layer_decay": self.vision_layer_decay, "freeze_vision": not self.train_vision,
                "freeze_projector": not self.train_projector, "freeze_language": not self.train_language}


STAGES: Dict[int, StageSpec] = {
    1: StageSpec(False, True, False, lr=1e-3, min_lr=1e-5, notes=["projector only (vision-language alignment)"]),
    2: StageSpec(True, True, True, lr=1e-5, min_lr=1e-7, vision_lr_mult=0.1, vision_layer_decay=0.9,
                 notes=["everything; ViT LR x0.1 with layer-wise decay 0.9^(L+1-layer)"]),
    3: StageSpec(False, True, True, lr=5e-6, min_lr=1e-7, notes=["LLM + projector, 128K context"]),
    4: StageSpec(False, True, True, lr=5e-6, min_lr=1e-7, notes=["LLM + projector, 1M context, logits mask"]),
}


def stage_defaults(stage: Optional[int]) -> Dict[str, Any]:
    if stage is None:
        return {}
    if stage not in STAGES:
        raise ValueError(f"--stage {stage}: Long-VITA has stages {sorted(STAGES)}")
    return STAGES[stage].defaults()
