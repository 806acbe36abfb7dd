"""`megatron-vita <command>`: one thin command line over importable functions.

Each command lives in the module that owns the work; that module exposes
`add_arguments(parser)` and `run(args) -> int`, and keeps heavy imports inside functions. Only
the chosen command's module is imported, and in this order: its flags are parsed (argparse
alone, so `--help` and a mistyped flag cost no torch, transformers or megatron-core), then the
backend is resolved (torch), then the command runs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import Callable, List, Optional

# name -> (module, one-line help)
COMMANDS = {
    "create-tiny": ("megatron_vita.hf.tiny", "write a tiny random Long-VITA checkpoint in the released HF layout"),
    "verify": ("megatron_vita.checkpoint.verify", "compare HF and megatron-core logits on text, image and video"),
    "convert": ("megatron_vita.checkpoint.convert", "convert checkpoints between HF and Megatron formats/layouts"),
    "data": ("megatron_vita.data.cli", "inspect stage recipes, make the synthetic demo dataset"),
    "train": ("megatron_vita.training.cli", "train a Long-VITA stage (Megatron-style flags, YAML recipes)"),
    "estimate": ("megatron_vita.estimate.cli", "per-device memory of a training layout (weights, optimizer, activations)"),
    "infer": ("megatron_vita.inference.cli", "answer a question about images / videos / text (HF or Megatron checkpoint)"),
    "eval": ("megatron_vita.evaluation.cli", "evaluate on Video-MME / MVBench / LongVideoBench as released (resumable)"),
    "serve": ("megatron_vita.serve.cli", "OpenAI-compatible HTTP server (chat completions, SSE, PUT /api) over a model"),
    "demo": ("megatron_vita.demo", "the CPU demo: data, stage 1+2 at TP=2, HF export, held-out accuracy"),
}


def _backend_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--backend", choices=["auto", "cpu", "cuda", "npu"], default=argparse.SUPPRESS,
                   help="hardware backend (default: $MEGATRON_VITA_BACKEND, else auto: npu > cuda > cpu)")
    return p


def _add_backend_to_subcommands(parser: argparse.ArgumentParser) -> None:
    """Give every nested subcommand (`data inspect`, ...) the --backend flag too, so it may follow
    any word of the command line."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if "--backend" not in sub._option_string_actions:
                    sub.add_argument("--backend", choices=["auto", "cpu", "cuda", "npu"], default=argparse.SUPPRESS,
                                     help="hardware backend (as before the command)")
                _add_backend_to_subcommands(sub)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    parent = _backend_parent()
    parser = argparse.ArgumentParser(
        prog="megatron-vita", parents=[parent],
        description="Long-VITA on megatron-core: training, checkpoint conversion, verification.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text, parents=[parent])
        if name == command:
            importlib.import_module(module).add_arguments(sp)
            _add_backend_to_subcommands(sp)
    return parser


def _chosen_command(argv: List[str]) -> Optional[str]:
    # The first word that names a command; --backend's values never collide with command names.
    return next((a for a in argv if a in COMMANDS), None)


# argparse only treats "-1" and "-.5" as values; "-1e-3", "-inf" or "-nan" after a flag would be
# read as an unknown option, so such a value is glued to its flag ("--lr=-1e-3") and the
# command's own checks can name it.
_NEGATIVE_VALUE = re.compile(r"^-(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def _glue_negative_values(argv: List[str]) -> List[str]:
    out: List[str] = []
    for token in argv:
        if (out and _NEGATIVE_VALUE.match(token) and out[-1].startswith("--") and "=" not in out[-1]
                and out[-1] != "--"):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def skip_exit_collection() -> None:
    """Let this process exit without the interpreter's final garbage collections.

    A process that imported torch, transformers and megatron-core spends about 2 s of CPU (2-core
    machine, measured) collecting their objects at exit, after its work is done: in every CLI
    process, spawned rank and dataloader worker, and so in every launch. Freezing the heap makes
    that collection skip them. atexit handlers, weakref finalizers, stream flushes and reference
    counting still run; only objects kept alive by reference cycles are never finalized, so call
    this once the process's results are written and its files closed.
    """
    import gc

    gc.freeze()


def console_main() -> int:
    """The `megatron-vita` executable (and `python -m megatron_vita`): main(), then a quick exit."""
    rc = main()
    skip_exit_collection()
    return rc


def main(argv: Optional[List[str]] = None) -> int:
    argv = _glue_negative_values(list(sys.argv[1:] if argv is None else argv))
    # Flags first: --help and a mistyped flag cost neither torch nor the command's imports (the
    # command modules import their heavy parts inside run()).
    parser = build_parser(_chosen_command(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # Then the backend, before the command runs: an unusable one fails in one line. The
    # platform module imports torch.
    from megatron_vita.platform import ENV_VAR, BackendUnavailableError, resolve_backend

    try:
        args.backend = resolve_backend(getattr(args, "backend", None))
    except BackendUnavailableError as e:
        print(f"megatron-vita: error: {e}", file=sys.stderr)
        return 2
    # Child processes (spawned ranks, dataloader workers) inherit the choice.
    os.environ[ENV_VAR] = args.backend
    module = importlib.import_module(COMMANDS[args.command][0])
    return run_command(args.command, module.run, args)


def run_command(name: str, run: Callable[[argparse.Namespace], Optional[int]], args: argparse.Namespace) -> int:
    """`run(args)` with expected failures as `megatron-vita NAME: error: ...` lines instead of a traceback.

    An error carrying several `problems` (a configuration checked as a whole) prints one line
    each. Under torchrun only each node's first process prints (the others found the same).
    """
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print("megatron-vita: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        # Expected failures (bad path, bad flag value, bad checkpoint); MEGATRON_VITA_DEBUG=1
        # shows the traceback.
        if os.environ.get("MEGATRON_VITA_DEBUG"):
            raise
        if os.environ.get("LOCAL_RANK", "0") == "0":
            for line in getattr(e, "problems", None) or [str(e)]:
                print(f"megatron-vita {name}: error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
