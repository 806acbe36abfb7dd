"""`megatron-vita eval`: a video benchmark as released, asked of any Generator, scored by letter.

    megatron-vita eval --benchmark video-mme|mvbench|longvideobench --data DIR --model_path DIR
        --output FILE [--nframe N] [--limit N] [--max_new_tokens N] [--max_seq_len N]
        [--tp N --pp N --cp N] [--tokenizer DIR] [kernel flags]

Order of work: the flags and --model_path (checked as `infer` checks them, one line per
problem), then the annotations (a missing or malformed file is one line naming it), then the
results file (another benchmark's or --nframe's is refused), then the model -- loaded only if
a question with a video is left to ask. Each answer is appended to --output as it comes (see
results.py), so an interrupted run loses at most the question in flight; rerunning the same
command resumes. stdout carries only the accuracy tables per group (Video-MME: duration,
domain, task type, sub-category; MVBench: task; LongVideoBench: duration group, question
category) and, last, `eval: accuracy=<percent> n=<questions>`; the same numbers go to --summary
(default: --output with `.summary.json`). Progress and whatever the model's libraries print go
to stderr.

Questions whose video is missing are recorded with an error, count as wrong in the accuracy
(so a partial download cannot raise the score), are listed in the summary's `errors`, and are
asked again on a rerun.

The model directory picks the generator as in `infer` (inference/cli.py's make_generator): an
HF directory (config.json) runs transformers (`HFGenerator`), a Megatron checkpoint
(latest_checkpointed_iteration.txt or iter_XXXXXXX) runs the megatron-core engine
(`MegatronGenerator`) on --tp x --pp x --cp spawned ranks, or on the torchrun processes: there
every process runs this command, rank 0 asks and writes, the others follow its requests.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

DEFAULT_NFRAME = 4096  # Long-VITA's MAX_NUM_FRAME default; its published sweep used 64 .. 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the HF directory's, or the "
                        "one a Megatron checkpoint's training recorded)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    from megatron_vita.inference.cli import add_model_path_arguments

    add_model_path_arguments(parser)


def summary_path(output: str, summary: Optional[str]) -> str:
    if summary:
        return summary
    stem = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
    return stem + ".summary.json"


def flag_problems(args) -> List[str]:
    out = []
    for name in ("nframe", "limit", "max_new_tokens", "max_seq_len"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            out.append(f"--{name} must be >= 1, got {value}")
    if os.path.isdir(args.output):
        out.append(f"--output {args.output} is a directory; give a file")
    return out


def open_generator(model_path: str, *, tp: Optional[int] = None, pp: Optional[int] = None,
                   vpp: Optional[int] = None, cp: Optional[int] = None, cp_algo: Optional[str] = None,
                   ulysses_degree_in_cp: Optional[int] = None, tokenizer: Optional[str] = None, dtype: str = "fp32",
                   backend: Optional[str] = None, features: Sequence[str] = (), prefill_chunk: Optional[int] = None):
    """The Generator for a model directory, chosen and built as `infer` does (an HF directory:
    transformers in this process; a Megatron checkpoint: the megatron-core engine on TP x PP x CP
    ranks), after the same one-line checks. Used by the adapters; `eval` checks first, then calls
    `inference.cli.make_generator` itself."""
    from megatron_vita.config.features import known_feature_names, normalize
    from megatron_vita.config.parallel import ConfigError
    from megatron_vita.inference.cli import make_generator, model_problems
    from megatron_vita.platform import resolve_backend

    wanted = {normalize(f) for f in features}
    args = argparse.Namespace(model_path=model_path, tp=tp, pp=pp, vpp=vpp, cp=cp, cp_algo=cp_algo,
                              ulysses_degree_in_cp=ulysses_degree_in_cp, prefill_chunk=prefill_chunk,
                              tokenizer=tokenizer, dtype=dtype, backend=resolve_backend(backend),
                              **{n.replace("-", "_"): n in wanted for n in known_feature_names()})
    kind, tokenizer, problems = model_problems(args)
    if problems:
        raise ConfigError(problems)
    return make_generator(kind, args, tokenizer)


def run(args: argparse.Namespace) -> int:
    from megatron_vita.config.parallel import ConfigError
    from megatron_vita.evaluation.benchmarks import BENCHMARKS, read_benchmark
    from megatron_vita.evaluation.results import (ResultsFile, pending, report_lines, run_questions, summarize,
                                                  write_summary)
    from megatron_vita.inference.cli import answer_channel, make_generator, model_problems

    # --model_path and its flags: infer's checks (one wording for infer, serve and eval)
    kind, tokenizer, problems = model_problems(args)
    problems = flag_problems(args) + problems
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
    # Read before any model loads (another benchmark's or --nframe's file is refused here). Under
    # torchrun every process reads it before the generator's collective start, so all agree on
    # whether a model is needed.
    todo = pending(questions, results.load())
    # stdout: the tables and the last line only; whatever a library or a spawned rank prints
    # while the model runs goes to stderr (infer's answer channel).
    with answer_channel() as out:
        generator = None
        try:
            if any(q.missing is None for q in todo):
                print(f"eval: {len(todo)} of {len(questions)} questions to ask; loading {args.model_path} ({kind})",
                      file=sys.stderr)
                generator = make_generator(kind, args, tokenizer)
                if not getattr(generator, "is_driver", True):
                    generator.follow()  # a torchrun rank other than 0: answers rank 0's requests
                    return 0
            records = run_questions(questions, generator, results, args.benchmark, args.nframe,
                                    args.max_new_tokens, args.max_seq_len)
        finally:
            close = getattr(generator, "close", None)
            if close is not None:
                close()
        summary = summarize(questions, records, BENCHMARKS[args.benchmark].group_keys, args.benchmark)
        summary.update(nframe=args.nframe, model_path=os.path.abspath(args.model_path),
                       output=os.path.abspath(args.output))
        write_summary(summary_path(args.output, args.summary), summary)
        for line in report_lines(summary):
            print(line, file=out)
    return 0
