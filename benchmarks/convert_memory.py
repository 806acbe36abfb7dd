"""Peak memory and throughput of `megatron-vita convert` on Long-VITA-14B tensor shapes.

Writes a synthetic HF checkpoint with the real `long-vita-14b` shapes (bf16, random bits, tensor
by tensor; `--layers K` keeps K of the 48 LLM layers when disk is short), then, side by side in
one run:
  1. HF -> Megatron TP8 (`--megatron-format`, default torch_dist), then the HF source is deleted,
  2. Megatron TP8 -> HF, then the Megatron copy is deleted and the result checked bit for bit
     against CRCs taken when the source was written.
Each conversion is paired with a plain file copy of its input (same bytes, same cache state),
timed right before it: the throughput ratio compares the two.
Each step runs in its own process; its peak RSS comes from the kernel (wait4's ru_maxrss).
Source files are flushed and evicted from the page cache before each timed step, so the copy
and the conversions start from the same cache state.

    python benchmarks/convert_memory.py --layers 40 --workdir /tmp/convert_bench
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9


def _run(cmd):
    """Run cmd; returns (seconds, peak RSS bytes of that process, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed with exit code {proc.returncode}\n{out}")
    return seconds, usage.ru_maxrss * 1024, out


def _files(path):
    for base, _, names in os.walk(path):
        for n in names:
            yield os.path.join(base, n)


def _size(path) -> int:
    return sum(os.path.getsize(f) for f in _files(path))


def _evict(path) -> None:
    """Flush and drop a directory's pages from the page cache (clean pages only; no root needed)."""
    for f in _files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _plain_copy(src: str, dst: str) -> float:
    """Seconds to copy `src` file by file and flush it to disk, from a cold page cache; dst removed after."""
    _evict(src)
    start = time.perf_counter()
    for f in _files(src):
        target = os.path.join(dst, os.path.relpath(f, src))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(f, target)
    _evict(dst)  # fsync: on disk, like the converter's output
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return seconds


def make_checkpoint(out: str, layers: int, seed: int = 0) -> None:
    """Child process: the synthetic HF checkpoint, one tensor in memory at a time; CRCs to crc.json."""
    import torch

    from megatron_vita.checkpoint.hf_format import HFWriter, model_shapes
    from megatron_vita.checkpoint.megatron_layout import ordered_params
    from megatron_vita.config.model import ModelConfig

    cfg = ModelConfig.from_name("long-vita-14b")
    cfg.language.num_layers = layers
    params = ordered_params(cfg)
    _, full_shapes = model_shapes(cfg)
    writer = HFWriter(out, cfg)
    writer.plan(params, full_shapes, lambda p: torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    crcs = {}

    def random_full(p):
        # Random bits viewed as bf16: every byte pattern, so any misplaced byte is caught.
        t = torch.randint(-32768, 32768, tuple(full_shapes[p.name]), dtype=torch.int16, generator=gen)
        return t.view(torch.bfloat16)

    from megatron_vita.checkpoint import mapping

    for p in params:
        full = random_full(p)
        for name, t in mapping.to_hf(cfg, p, full).items():
            crcs[name] = zlib.crc32(t.contiguous().view(torch.int16).numpy())
        writer.write(p, full)
    writer.finish()
    with open(os.path.join(os.path.dirname(out), "crc.json"), "w") as f:
        json.dump(crcs, f)


def check_checkpoint(path: str, crc_file: str) -> None:
    """Child process: every tensor of `path` against the CRCs of the source."""
    import torch

    from megatron_vita.checkpoint.hf_format import HFSource

    with open(crc_file) as f:
        crcs = json.load(f)
    src = HFSource(path)
    names = src.shapes()
    if set(names) != set(crcs):
        raise SystemExit(f"tensor names differ: {sorted(set(names) ^ set(crcs))[:5]}")
    bad = [n for n in names if zlib.crc32(src.read(n).contiguous().view(torch.int16).numpy()) != crcs[n]]
    if bad:
        raise SystemExit(f"{len(bad)} tensors differ after the round trip, e.g. {bad[:3]}")
    print(f"round trip bit-exact: {len(names)} tensors")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=48, help="LLM layers kept of 48 (disk: ~0.55 GB per layer + 3.7 GB)")
    p.add_argument("--workdir", default="/tmp/convert_bench")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--megatron-format", choices=["torch_dist", "legacy"], default="torch_dist")
    p.add_argument("--min-free-gb", type=float, default=20.0, help="refuse to start if the run would leave less")
    p.add_argument("--make", nargs=2, metavar=("OUT", "LAYERS"), help=argparse.SUPPRESS)
    p.add_argument("--check", nargs=2, metavar=("DIR", "CRC"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.make:
        make_checkpoint(a.make[0], int(a.make[1]))
        return 0
    if a.check:
        check_checkpoint(*a.check)
        return 0

    per_copy = (0.5505 * a.layers + 3.75) * GB  # bf16 bytes of the 14B shapes with K layers
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(a.workdir)) or "/").free
    if free - 2 * per_copy < a.min_free_gb * GB:
        raise SystemExit(f"--layers {a.layers} needs ~{2 * per_copy / GB:.0f} GB at peak; {free / GB:.0f} GB free "
                         f"and {a.min_free_gb:.0f} GB must stay free: lower --layers")
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    hf, copy, mg, back = (os.path.join(a.workdir, n) for n in ("hf", "copy", "megatron_tp8", "hf_back"))
    py = [sys.executable]
    convert = py + ["-m", "megatron_vita", "--backend", "cpu", "convert", "--no-progress"]
    report = {"layers": a.layers, "tp": a.tp, "megatron_format": a.megatron_format}
    try:
        s, rss, _ = _run(py + [__file__, "--make", hf, str(a.layers)])
        nbytes = _size(hf)
        report["checkpoint"] = {"bytes": nbytes, "seconds": round(s, 1), "peak_rss_gib": round(rss / 2 ** 30, 3)}
        print(f"synthetic HF checkpoint: {nbytes / GB:.2f} GB ({a.layers} LLM layers) in {s:.0f}s")

        steps = [
            ("hf_to_megatron", convert + ["--from", "hf", "--to", "megatron", "--input", hf, "--output", mg,
                                          "--tp", str(a.tp), "--megatron-format", a.megatron_format], hf, mg),
            ("megatron_to_hf", convert + ["--from", "megatron", "--to", "hf", "--input", mg, "--output", back], mg, back),
        ]
        for name, cmd, src, dst in steps:
            # The baseline: a plain copy of this step's input, measured right before the step,
            # so that both see the same machine (other jobs share its disk and CPUs).
            src_bytes = _size(src)
            s_copy = _plain_copy(src, copy)
            _evict(src)
            s, rss, _ = _run(cmd)
            ratio = (nbytes / s) / (src_bytes / s_copy)
            report[name] = {"seconds": round(s, 1), "gb_per_s": round(nbytes / GB / s, 3),
                            "peak_rss_gib": round(rss / 2 ** 30, 3), "output_bytes": _size(dst),
                            "plain_copy_of_input": {"bytes": src_bytes, "seconds": round(s_copy, 1),
                                                    "gb_per_s": round(src_bytes / GB / s_copy, 3)},
                            "vs_plain_copy": round(ratio, 3)}
            print(f"plain copy of the input: {s_copy:.1f}s, {src_bytes / GB / s_copy:.2f} GB/s")
            print(f"{name}: {s:.1f}s, {nbytes / GB / s:.2f} GB/s ({ratio:.0%} of plain copy), "
                  f"peak RSS {rss / 2 ** 30:.2f} GiB", flush=True)
            shutil.rmtree(src)  # no longer needed: keeps the disk peak at two copies
        _, _, out = _run(py + [__file__, "--check", back, os.path.join(a.workdir, "crc.json")])
        print(out.strip())
    finally:
        for d in (hf, copy, mg, back):
            shutil.rmtree(d, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
