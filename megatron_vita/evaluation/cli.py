"""`megatron-vita eval`: a video benchmark as released, asked of any Generator, scored by letter.

    megatron-vita eval --benchmark video-mme|mvbench|longvideobench --data DIR --model_path DIR
        --output FILE [--nframe N] [--limit N] [--max_new_tokens N] [--max_seq_len N]
        [--tp N --pp N --cp N] [--tokenizer DIR] [kernel flags]

Order of work: flags, then the annotations (a missing or malformed file is one line naming it),
then the results file (another benchmark's or --nframe's is refused), then the model -- loaded
only if a question is left to ask. Each answer is appended to --output as it comes (see
results.py), so an interrupted run loses at most the question in flight; rerunning the same
command resumes. stdout: the accuracy tables per group (Video-MME: duration, domain, task type,
sub-category; MVBench: task; LongVideoBench: duration group, question category), then
`eval: accuracy=<percent> n=<questions>` as the last line; the same numbers go to --summary
(default: --output with `.summary.json`). Progress goes to stderr.

Questions whose video is missing are recorded with an error, count as wrong in the accuracy
(so a partial download cannot raise the score), are listed in the summary's `errors`, and are
asked again on a rerun.

The model directory picks the generator: an HF directory (config.json) runs transformers
(`inference.hf_generator.HFGenerator`), a Megatron checkpoint (latest_checkpointed_iteration.txt
or iter_XXXXXXX) runs the megatron-core engine (`inference.engine.MegatronGenerator`) on
--tp x --pp x --cp ranks; both are imported only when needed.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

DEFAULT_NFRAME = 4096  # Long-VITA's MAX_NUM_FRAME default; its published sweep used 64 .. 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_vita.config.features import add_feature_arguments

    parser.add_argument("--benchmark", required=True, choices=["video-mme", "mvbench", "longvideobench"])
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="the benchmark as released (Video-MME: videomme/*.parquet + data/ or video/; MVBench: "
                        "json/ + video/; LongVideoBench: lvb_val.json + videos/)")
    parser.add_argument("--model_path", "--model-path", dest="model_path", required=True, metavar="DIR",
                        help="an HF Long-VITA directory or a Megatron checkpoint")
    parser.add_argument("--output", required=True, metavar="FILE",
                        help="results, JSON lines (one per question); an existing file is resumed")
    parser.add_argument("--summary", metavar="FILE", help="accuracy tables as JSON (default: OUTPUT.summary.json)")
    parser.add_argument("--nframe", "--max_num_frame", dest="nframe", type=int, default=DEFAULT_NFRAME,
                        help=f"frames sampled per video at <= 1 fps (default {DEFAULT_NFRAME}, Long-VITA's)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions (annotation order)")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=1024,
                        help="per answer (default 1024, as Long-VITA's evaluation; greedy decoding)")
    parser.add_argument("--max_seq_len", "--max-seq-len", dest="max_seq_len", type=int, default=None,
                        help="prompt + answer tokens (default: the model's limit)")
    parser.add_argument("--tokenizer", metavar="DIR", help="Megatron checkpoint: tokenizer (default: the one "
                        "recorded at training time)")
    parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=None)
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=None)
    parser.add_argument("--cp", "--context-parallel-size", dest="cp", type=int, default=None)
    parser.add_argument("--prefill-chunk", dest="prefill_chunk", type=int, default=None,
                        help="megatron-core: prefill the prompt in chunks of N tokens")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    add_feature_arguments(parser)


def summary_path(output: str, summary: Optional[str]) -> str:
    if summary:
        return summary
    stem = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
    return stem + ".summary.json"


def flag_problems(args) -> List[str]:
    out = []
    for name in ("nframe", "limit", "max_new_tokens", "max_seq_len", "tp", "pp", "cp", "prefill_chunk"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            out.append(f"--{name} must be >= 1, got {value}")
    if not os.path.exists(args.model_path):
        out.append(f"--model_path {args.model_path} does not exist")
    if os.path.isdir(args.output):
        out.append(f"--output {args.output} is a directory; give a file")
    return out


def model_kind(path: str) -> str:
    """'hf' for a transformers directory, 'megatron' for a Megatron save root or iteration dir."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    from megatron_vita.checkpoint.megatron_layout import resolve_iteration_dir

    try:
        resolve_iteration_dir(path)
    except (FileNotFoundError, ValueError):
        raise FileNotFoundError(f"--model_path {path} is neither an HF Long-VITA directory (config.json) nor a "
                                "Megatron checkpoint (latest_checkpointed_iteration.txt or iter_XXXXXXX)") from None
    return "megatron"


def open_generator(model_path: str, *, tp: int = 1, pp: int = 1, cp: int = 1, tokenizer: Optional[str] = None,
                   dtype: str = "fp32", backend: Optional[str] = None, features: Sequence[str] = (),
                   prefill_chunk: Optional[int] = None):
    """The Generator for a model directory: transformers for an HF directory, the megatron-core
    engine on TP x PP x CP ranks for a Megatron checkpoint. Imported lazily, so the HF path never
    imports megatron-core. Shared by `eval` and the lmms-eval / VLMEvalKit adapters."""
    from megatron_vita.platform import resolve_backend

    backend = resolve_backend(backend)
    kind = model_kind(model_path)
    if kind == "hf":
        layout = [f"--{k} {v}" for k, v in (("tp", tp), ("pp", pp), ("cp", cp)) if v not in (None, 1)]
        if layout:
            raise ValueError(f"{layout[0]} sets megatron-core ranks, but --model_path {model_path} is an HF "
                             "directory run by transformers; convert it to a Megatron checkpoint (megatron-vita "
                             "convert) to evaluate it on several ranks")
        from megatron_vita.inference.hf_generator import HFGenerator

        return HFGenerator(model_path, backend=backend, dtype=dtype, tokenizer=tokenizer)
    from megatron_vita.config.parallel import ParallelConfig
    from megatron_vita.inference.engine import MegatronGenerator

    par = ParallelConfig(tensor_model_parallel_size=tp or 1, pipeline_model_parallel_size=pp or 1,
                         context_parallel_size=cp or 1)
    return MegatronGenerator(model_path, par, tokenizer=tokenizer, backend=backend, features=tuple(features),
                             prefill_chunk=prefill_chunk, dtype=dtype)


def _generator_from_args(args):
    from megatron_vita.config.features import enabled_features

    return open_generator(args.model_path, tp=args.tp or 1, pp=args.pp or 1, cp=args.cp or 1,
                          tokenizer=args.tokenizer, dtype=args.dtype, backend=getattr(args, "backend", None),
                          features=enabled_features(args), prefill_chunk=args.prefill_chunk)


def run(args: argparse.Namespace) -> int:
    from megatron_vita.config.parallel import ConfigError
    from megatron_vita.evaluation.benchmarks import BENCHMARKS, read_benchmark
    from megatron_vita.evaluation.results import (ResultsFile, report_lines, run_questions, summarize,
                                                  write_summary)

    problems = flag_problems(args)
    if problems:
        raise ConfigError(problems)
    questions = read_benchmark(args.benchmark, args.data)
    if args.limit is not None:
        questions = questions[: args.limit]
    if not questions:
        raise ValueError(f"--data {args.data}: the {args.benchmark} annotations hold no questions")
    missing = sum(q.missing is not None for q in questions)
    if missing:
        print(f"eval: {missing} of {len(questions)} questions have no video (recorded as errors, counted wrong)",
              file=sys.stderr)
    results = ResultsFile(args.output, args.benchmark, args.nframe)
    results.load()  # refuses another benchmark's / --nframe's file before the model loads
    model_kind(args.model_path)
    generator = None

    def factory():
        nonlocal generator
        generator = _generator_from_args(args)
        return generator

    try:
        records = run_questions(questions, factory, results, args.benchmark, args.nframe, args.max_new_tokens,
                                args.max_seq_len)
    finally:
        close = getattr(generator, "close", None)
        if close is not None:
            close()
    summary = summarize(questions, records, BENCHMARKS[args.benchmark].group_keys, args.benchmark)
    summary.update(nframe=args.nframe, model_path=os.path.abspath(args.model_path), output=os.path.abspath(args.output))
    write_summary(summary_path(args.output, args.summary), summary)
    for line in report_lines(summary):
        print(line)
    sys.stdout.flush()
    return 0
