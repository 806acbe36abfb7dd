"""Process start-up and exit costs, side by side: what every launcher, rank and worker pays.

Every `megatron-vita` command starts a launcher, spawned ranks and (training) spawned dataloader
workers, each a fresh interpreter, so import and exit costs are paid per process. Measured here in
fresh interpreters, alternating the two variants of each case `--repeats` times (medians):

  tokenizer  `import megatron_vita` + a tokenizer load (what the data pipeline, the preflight checks
             and every worker do) as the project does it (the model classes are registered with the
             first LongVITAConfig) vs registering them when transformers' Auto classes load (what it
             did before: the modeling import, in a process that never builds an HF model);
  exit       a process holding torch, transformers' modeling code and megatron-core, exiting
             normally vs after `cli.skip_exit_collection()` (what CLI processes, spawned ranks and
             workers now do): the wall time from its last statement to the process having exited.

Prints each median and the ratio old / new. Goals: each ratio >= 1.5 (2-core machine, idle).

    python benchmarks/startup.py
    python benchmarks/startup.py --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

GOAL = 1.5

TOKENIZER = textwrap.dedent("""
    import sys, time
    t0 = time.perf_counter()
    import megatron_vita
    if sys.argv[2] == "eager":
        from megatron_vita.hf import register_auto_classes
        register_auto_classes()
    from megatron_vita.data.template import load_tokenizer
    load_tokenizer(sys.argv[1])
    print(time.perf_counter() - t0)
""")

EXIT = textwrap.dedent("""
    import sys, time
    import torch, transformers.modeling_utils, megatron.core
    import megatron_vita.hf.modeling
    if sys.argv[1] == "frozen":
        from megatron_vita.cli import skip_exit_collection
        skip_exit_collection()
    print(time.time(), flush=True)
""")


def _run(code: str, *argv: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return proc.stdout.strip().splitlines()[-1]


def tokenizer_seconds(tok_dir: str, variant: str) -> float:
    return float(_run(TOKENIZER, tok_dir, variant))


def exit_seconds(variant: str) -> float:
    """Wall time from the process's last statement until it has exited."""
    proc = subprocess.Popen([sys.executable, "-c", EXIT, variant], stdout=subprocess.PIPE, text=True)
    last_statement = float(proc.stdout.readline())
    proc.wait()
    return time.time() - last_statement


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant (alternating); medians")
    args = parser.parse_args(argv)
    from megatron_vita.data.demo import train_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(["a cat on a mat", "two red squares", "a video of a moving bar"] * 4, tmp)
        cases = {"tokenizer": (lambda v: tokenizer_seconds(tmp, v), "eager", "lazy"),
                 "exit": (exit_seconds, "normal", "frozen")}
        for name, (measure, old, new) in cases.items():
            times = {old: [], new: []}
            for _ in range(args.repeats):
                for variant in (old, new):
                    times[variant].append(measure(variant))
            o, n = statistics.median(times[old]), statistics.median(times[new])
            rows.append((name, old, o, new, n, o / n))
    print(f"{'case':<10} {'before':>16} {'now':>16} {'ratio':>7}")
    for name, old, o, new, n, ratio in rows:
        print(f"{name:<10} {old + f' {o:.2f}s':>16} {new + f' {n:.2f}s':>16} {ratio:>6.2f}x")
    ok = all(r[-1] >= GOAL for r in rows)
    print(f"goal: every ratio >= {GOAL}: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
