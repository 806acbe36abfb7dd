"""`megatron-vita convert`: any Long-VITA checkpoint format/layout to any other, streamed.

Sources and targets: HF (the released `*_HF` layout), Megatron legacy
(`iter_*/mp_rank_*/model_optim_rng.pt`, names mcore | mindspeed | te, detected when reading)
and megatron-core dist checkpoints (torch_dist, what training saves). Every conversion goes
tensor by tensor through the full (TP-unsharded) megatron-core tensor of each parameter:
source -> `full(param)` -> target shards/renames/transforms it and writes it at once, so peak
memory is about the largest tensor plus its pieces, whatever the model size.

Safety: names and shapes of the source, and that `--output` can be written, are checked
before anything is written; output goes to a hidden `.NAME.partial-PID` directory beside the
destination and is renamed into place only when complete (a killed run leaves no
checkpoint-looking directory; the next run removes the dead run's partial directory). An
existing destination is replaced only with `--force`, and then only the files a checkpoint
consists of (weights, indexes, configs, tokenizer files, iteration directories and tracker):
anything else in the directory is kept.

Decisions: TP larger than the LLM's KV groups is refused (ParallelConfig.validate says so)
rather than replicating KV heads. The vocabulary is padded to a multiple of
`--make-vocab-size-divisible-by` x TP (default 1: the released 152064 rows stay unpadded up to
TP8); padded rows are zeros and are dropped on export.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
from contextlib import contextmanager
from typing import Callable, Optional

from megatron_vita.config.dtypes import DTYPES, torch_dtype
from megatron_vita.config.parallel import ParallelConfig


# What a checkpoint of either target format consists of. `--force` replaces these entries of an
# existing --output and keeps everything else. Markers are what makes a directory look like a
# complete checkpoint to a reader: they leave first and arrive last, so a run killed while
# swapping checkpoints leaves no valid-looking mixture.
_MARKERS = re.compile(r"^(latest_checkpointed_iteration\.txt|model\.safetensors\.index\.json|"
                      r"pytorch_model\.bin\.index\.json|model\.safetensors|pytorch_model\.bin)$")
_CHECKPOINT_ENTRY = re.compile(r"^(iter_\d+|release|config\.json|model-\d+-of-\d+\.safetensors|"
                               r"pytorch_model-\d+-of-\d+\.bin)$")


def is_checkpoint_entry(name: str) -> bool:
    """Whether a file or directory named `name` in an output directory belongs to the checkpoint."""
    from megatron_vita.checkpoint.hf_format import AUX_FILES

    return bool(_MARKERS.match(name) or _CHECKPOINT_ENTRY.match(name)) or name in AUX_FILES


def check_output(dst: str, force: bool) -> None:
    """Refuse an --output that exists without --force, is a file, or cannot be written (nothing is created)."""
    if os.path.exists(dst):
        if not os.path.isdir(dst):
            raise FileExistsError(f"--output {dst} exists and is not a directory")
        if os.listdir(dst) and not force:
            raise FileExistsError(f"--output {dst} exists; pass --force to replace it (files that are not part "
                                  "of a checkpoint are kept)")
    # The partial directory is made beside dst, so dst's parent (or its nearest existing
    # ancestor) must be a writable directory, and so must dst itself when files move into it.
    ancestor = os.path.dirname(os.path.abspath(dst))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    for where in [ancestor] + ([dst] if os.path.isdir(dst) else []):
        if not os.path.isdir(where):
            raise ValueError(f"--output {dst}: {where} is not a directory")
        if not os.access(where, os.W_OK | os.X_OK):
            raise ValueError(f"--output {dst}: {where} is not writable")


def _dead(name: str, prefix: str) -> bool:
    """Whether `name` is `prefix` + the pid of a process that no longer runs."""
    if not (name.startswith(prefix) and name[len(prefix):].isdigit()):
        return False
    pid = int(name[len(prefix):])
    try:
        os.kill(pid, 0)
        return pid == os.getpid()
    except ProcessLookupError:
        return True
    except PermissionError:
        return False


def _remove_dead_partials(dst: str) -> None:
    parent, base = os.path.split(os.path.abspath(dst))
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        if _dead(name, f".{base}.partial-") or _dead(name, f".{base}.old-"):
            path = os.path.join(parent, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


@contextmanager
def atomic_output(dst: str, force: bool):
    """Yield a hidden partial directory; move its contents to `dst` only when the block completes."""
    dst = os.path.abspath(dst)
    check_output(dst, force)
    parent, base = os.path.split(dst)
    partial = os.path.join(parent, f".{base}.partial-{os.getpid()}")
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_dead_partials(dst)
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    except OSError as e:
        raise ValueError(f"--output {dst}: cannot create {e.filename or partial} ({e.strerror})") from None
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _install(partial, dst)


def _install(partial: str, dst: str) -> None:
    """Move a complete checkpoint from `partial` into `dst`, replacing only dst's checkpoint entries."""
    if not os.path.isdir(dst) or not os.listdir(dst):
        if os.path.isdir(dst):
            os.rmdir(dst)
        os.rename(partial, dst)
        return
    parent, base = os.path.split(dst)
    old = os.path.join(parent, f".{base}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.makedirs(old)
    new = os.listdir(partial)
    present = os.listdir(dst)
    replaced = {n for n in present if is_checkpoint_entry(n)} | (set(new) & set(present))
    for name in sorted(replaced, key=lambda n: not _MARKERS.match(n)):  # markers leave first
        os.rename(os.path.join(dst, name), os.path.join(old, name))
    for name in sorted(new, key=lambda n: bool(_MARKERS.match(n))):  # markers arrive last
        os.rename(os.path.join(partial, name), os.path.join(dst, name))
    os.rmdir(partial)
    shutil.rmtree(old)


class ReadAhead:
    """Reads the next tensor (in the target's fetch order) on a thread while the current one is written.

    Reading and writing then overlap on the disk and on the two kinds of CPU work. Only tensors
    up to `max_bytes` are read ahead, so memory holds at most the current tensor plus one
    mid-sized one (the 1.5 GB embedding of the 14B model is never read ahead).
    """

    def __init__(self, read: Callable, order, nbytes: Callable, max_bytes: int = 600 * 1024 ** 2):
        from concurrent.futures import ThreadPoolExecutor

        self.read, self.nbytes, self.max_bytes = read, nbytes, max_bytes
        self.following = {a.name: b for a, b in zip(order, order[1:])}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="convert-read")
        self.pending = {}

    def get(self, p):
        fut = self.pending.pop(p.name, None)
        full = fut.result() if fut is not None else self.read(p)
        nxt = self.following.get(p.name)
        if nxt is not None and nxt.name not in self.pending and self.nbytes(nxt) <= self.max_bytes:
            self.pending[nxt.name] = self.pool.submit(self.read, nxt)
        return full

    def close(self) -> None:
        for fut in self.pending.values():
            fut.cancel()
        self.pool.shutdown(wait=True)
        self.pending.clear()


def _progress(total_bytes: int, total_tensors: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
                disable=not enabled, dynamic_ncols=True, postfix={"tensors": f"0/{total_tensors}"})


def convert(src: str, dst: str, src_format: str = "hf", dst_format: str = "megatron", *,
            layout: Optional[ParallelConfig] = None, megatron_format: str = "torch_dist", names: str = "mcore",
            dtype: Optional[str] = None,
            force: bool = False, verify: bool = False, model: Optional[str] = None, tokenizer: Optional[str] = None,
            iteration: Optional[int] = None, max_shard_size: Optional[int] = None, progress: bool = True,
            on_tensor: Optional[Callable[[str, int], None]] = None, log=print,
            backend: Optional[str] = None) -> dict:
    """Convert `src` (format `src_format`: hf | megatron) to `dst` (`dst_format`).

    Megatron targets take the `layout` (TP, PP, VPP, uneven first/last stage, vocab divisor;
    default TP1 PP1), `megatron_format` (torch_dist | legacy) and `names` (mcore | mindspeed | te; torch_dist
    accepts all three, training loads mcore). `dtype` (bf16 | fp16 | fp32) casts, default: the
    source's. HF targets copy tokenizer/processor files from `tokenizer` (default: the HF source
    or the --model directory). `on_tensor(name, bytes)` is called as each tensor is handed to the
    target (progress reporting; tests use it to kill a conversion mid-way). `verify` runs both
    sides on `backend`'s device (default: the active platform's, i.e. --backend).
    Returns a summary dict (tensors, bytes, seconds, verify result if asked).
    """
    import time

    import torch

    from megatron_vita.checkpoint.hf_format import DEFAULT_MAX_SHARD, HFWriter, model_shapes
    from megatron_vita.checkpoint.megatron_layout import iteration_dir_name, ordered_params, write_tracker
    from megatron_vita.checkpoint.sources import open_source

    if dst_format not in ("hf", "megatron"):
        raise ValueError(f"--to {dst_format!r}: use hf or megatron")
    if megatron_format not in ("torch_dist", "legacy"):
        raise ValueError(f"--megatron-format {megatron_format!r}: use torch_dist or legacy")
    from megatron_vita.checkpoint.mapping import NAMINGS

    if names not in NAMINGS:
        raise ValueError(f"--names {names!r}: use one of {sorted(NAMINGS)}")
    src_real, dst_real = os.path.realpath(src), os.path.realpath(dst)
    if src_real == dst_real or src_real.startswith(dst_real + os.sep) or dst_real.startswith(src_real + os.sep):
        raise ValueError(f"--output {dst} overlaps --input {src}; write the conversion somewhere else")
    check_output(dst, force)
    cast = torch_dtype(dtype) if dtype is not None else None
    source = open_source(src_format, src, model)
    cfg = source.cfg
    try:
        params = ordered_params(cfg)
        _, full_shapes = model_shapes(cfg)
        layout = layout if layout is not None else ParallelConfig()
        if dst_format == "megatron":
            layout.validate(cfg)
        it = iteration if iteration is not None else (getattr(source, "iteration", None) or 0)
        dtype_for = (lambda p: cast) if cast is not None else source.dtype_of
        what = (f"Megatron {megatron_format} {layout.describe()} ({names} names)" if dst_format == "megatron"
                else "HF safetensors")
        log(f"convert: {src_format} {src} -> {what} {dst}")
        kept = sorted(n for n in os.listdir(dst) if not is_checkpoint_entry(n)) if os.path.isdir(dst) else []
        if kept:
            log(f"convert: keeping {len(kept)} entries of {dst} that are not part of a checkpoint: "
                + ", ".join(kept[:8]) + (" ..." if len(kept) > 8 else ""))
        start = time.perf_counter()
        with atomic_output(dst, force) as out:
            if dst_format == "hf":
                aux = tokenizer or (src if src_format == "hf" else model if model and os.path.isdir(model) else None)
                target = HFWriter(out, cfg, max_shard_size or DEFAULT_MAX_SHARD, aux)
            else:
                iter_dir = os.path.join(out, iteration_dir_name(it))
                if megatron_format == "legacy":
                    from megatron_vita.checkpoint.legacy_format import LegacyWriter

                    target = LegacyWriter(iter_dir, cfg, layout, names, it)
                else:
                    from megatron_vita.checkpoint.dist_format import DistWriter

                    target = DistWriter(iter_dir, cfg, layout, names, it)
            target.plan(params, full_shapes, dtype_for)
            total = sum(full_shapes[p.name].numel() * dtype_for(p).itemsize for p in params)
            bar = _progress(total, len(params), progress)
            done = {"tensors": 0, "bytes": 0}

            ahead = ReadAhead(source.full, target.fetch_order(params),
                              lambda p: full_shapes[p.name].numel() * source.dtype_of(p).itemsize)

            def fetch(p):
                full = ahead.get(p)
                if tuple(full.shape) != tuple(full_shapes[p.name]):
                    raise ValueError(f"{p.name}: source gives shape {list(full.shape)}, the model config expects "
                                     f"{list(full_shapes[p.name])}")
                nbytes = full.numel() * dtype_for(p).itemsize
                done["tensors"] += 1
                done["bytes"] += nbytes
                bar.update(nbytes)
                bar.set_postfix(tensors=f"{done['tensors']}/{len(params)}", refresh=False)
                if on_tensor is not None:
                    on_tensor(p.name, nbytes)
                return full

            try:
                with torch.no_grad():
                    target.write_all(params, fetch)
            finally:
                ahead.close()
            target.finish()
            bar.close()
            if dst_format == "megatron":
                write_tracker(out, it)  # last: only a complete directory names its iteration
        seconds = time.perf_counter() - start
    except OSError as e:
        if e.filename is None:  # our own FileNotFoundErrors carry their whole message
            raise
        # Disk full, a file or directory that cannot be written or read: one line naming it.
        raise RuntimeError(f"{e.filename}: {e.strerror}") from None
    finally:
        source.close()
    summary = {"tensors": done["tensors"], "bytes": done["bytes"], "seconds": seconds}
    log(f"convert: wrote {done['tensors']} tensors, {done['bytes'] / 1e9:.2f} GB in {seconds:.1f}s "
        f"({done['bytes'] / 1e9 / max(seconds, 1e-9):.2f} GB/s) to {dst}")
    if verify:
        summary["verify"] = verify_conversion(src, src_format, dst, dst_format, model, log=log, backend=backend)
    return summary


def verify_conversion(src: str, src_format: str, dst: str, dst_format: str, model: Optional[str] = None,
                      log=print, backend: Optional[str] = None) -> dict:
    """Logits of source and converted checkpoint on text, image+text and video+text, on `backend`."""
    from megatron_vita.checkpoint.verify import CheckpointRef, verify_pair

    ref = CheckpointRef(src_format, src, model)
    cand = CheckpointRef(dst_format, dst, model)
    summary = verify_pair(ref, cand, backend=backend, log=log)
    if not summary["passed"]:
        raise RuntimeError(f"verification failed: cosine={summary['cosine']:.6f} top1={summary['top1']:.2f}% "
                           "(need cosine >= 0.9999 and top-1 100% in fp32)")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="src_format", choices=["hf", "megatron"], required=True)
    parser.add_argument("--to", dest="dst_format", choices=["hf", "megatron"], required=True)
    parser.add_argument("--input", required=True, metavar="SRC",
                        help="HF checkpoint directory, or a Megatron save root / iter_XXXXXXX directory")
    parser.add_argument("--output", required=True, metavar="DST", help="where the converted checkpoint goes")
    parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    parser.add_argument("--vpp", "--virtual-pipeline-model-parallel-size", dest="vpp", type=int, default=None)
    parser.add_argument("--decoder-first-pipeline-num-layers", dest="first_stage_layers", type=int, default=None)
    parser.add_argument("--decoder-last-pipeline-num-layers", dest="last_stage_layers", type=int, default=None)
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=1,
                        help="pad the vocabulary to a multiple of this x TP (default 1: 152064 rows stay unpadded)")
    parser.add_argument("--megatron-format", choices=["torch_dist", "legacy"], default="torch_dist",
                        help="Megatron target format (default torch_dist, what training loads)")
    parser.add_argument("--names", choices=["mcore", "mindspeed", "te"], default="mcore",
                        help="Megatron target naming (sources are detected)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    parser.add_argument("--model", metavar="SPEC", default=None,
                        help="model config for Megatron sources without one (released MindSpeed/TE weights): "
                             "a preset, a HF checkpoint directory or a config JSON")
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="HF target: copy tokenizer/processor/generation files from DIR")
    parser.add_argument("--iteration", type=int, default=None, help="Megatron target iteration (default: source's or 0)")
    parser.add_argument("--max-shard-size", type=int, default=None, metavar="BYTES",
                        help="HF target shard size (default 5e9)")
    parser.add_argument("--force", action="store_true", help="replace the checkpoint in an existing --output "
                        "(weights, indexes, configs, tokenizer files, iter_* and the tracker; other files are kept)")
    parser.add_argument("--verify", action="store_true", help="compare source and target logits after converting")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def layout_of(args: argparse.Namespace) -> ParallelConfig:
    """The Megatron target layout the flags describe."""
    return ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                          virtual_pipeline_model_parallel_size=args.vpp,
                          num_layers_in_first_pipeline_stage=args.first_stage_layers,
                          num_layers_in_last_pipeline_stage=args.last_stage_layers,
                          make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)


def run(args: argparse.Namespace) -> int:
    convert(args.input, args.output, args.src_format, args.dst_format, layout=layout_of(args),
            megatron_format=args.megatron_format,
            names=args.names, dtype=args.dtype, force=args.force, verify=args.verify, model=args.model,
            tokenizer=args.tokenizer, iteration=args.iteration, max_shard_size=args.max_shard_size,
            progress=not args.no_progress, backend=getattr(args, "backend", None))
    return 0
