"""`megatron-vita serve`: the OpenAI-compatible server over one Long-VITA model.

Owns the command line: flags, their checks (all before the model loads, one line per problem),
the choice of Generator by what `--model_path` holds (an HF directory: transformers' path; a
Megatron checkpoint: the megatron-core engine with `--tp/--pp/--cp`, spawned ranks or torchrun),
and the uvicorn run. Under torchrun only rank 0 serves HTTP: the engine keeps the other ranks
following its broadcasts, so on them this command just builds the generator and returns when it
is closed.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import List

from megatron_vita.serve.settings import DEFAULT_MAX_FRAMES, DEFAULT_MAX_TOKENS, ServeSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_path", "--model-path", dest="model_path", required=True, metavar="DIR",
                        help="a Long-VITA HF directory (transformers) or a Megatron checkpoint (megatron-core)")
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="tokenizer directory (default: the HF directory's, or the one recorded at training)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients send (default: the --model_path directory's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed at start)")
    g = parser.add_argument_group("media and limits (a request over a limit gets a 4xx naming it)")
    g.add_argument("--media-root", metavar="DIR", default=None,
                   help="local paths and file:// URLs are accepted only inside DIR (default: refused)")
    g.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) media URLs (default: refused)")
    g.add_argument("--max-request-mb", type=float, default=64, help="request body size (also each remote medium)")
    g.add_argument("--max-images", type=int, default=16, help="images per request")
    g.add_argument("--max-videos", type=int, default=4, help="videos per request")
    g.add_argument("--max-frames", type=int, default=DEFAULT_MAX_FRAMES,
                   help="frames sampled per video (<= 1 fps); a request's max_num_frame may only lower it")
    g.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="new tokens per answer, and the default when a request gives none")
    g.add_argument("--max_seq_len", "--max-seq-len", dest="max_seq_len", type=int, default=None,
                   help="prompt + answer tokens (default: the model's limit)")
    g.add_argument("--max-concurrency", type=int, default=64,
                   help="requests held at once, generating (one at a time) or waiting in arrival order; "
                   "more are refused with 429")
    m = parser.add_argument_group("model")
    m.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="compute dtype")
    m.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=None,
                   help="Megatron checkpoints: tensor-parallel ranks (default: the checkpoint's)")
    m.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=None)
    m.add_argument("--cp", "--context-parallel-size", dest="cp", type=int, default=None,
                   help="context-parallel ranks; the world is TP*PP*CP ranks")
    m.add_argument("--cp-algo", "--context-parallel-algo", dest="cp_algo", default=None,
                   help="ring (default), ulysses or hybrid (MindSpeed's names accepted)")
    m.add_argument("--prefill-chunk", type=int, default=None,
                   help="Megatron checkpoints: prefill the prompt in chunks of N tokens (bounded memory)")
    m.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    from megatron_vita.config.features import add_feature_arguments

    add_feature_arguments(parser)


_MEGATRON_ONLY = {"tp": "--tp", "pp": "--pp", "cp": "--cp", "cp_algo": "--cp-algo", "prefill_chunk": "--prefill-chunk"}


def is_hf_dir(path: str) -> bool:
    """An HF checkpoint has config.json at its top; a Megatron save root or iteration dir has not."""
    return os.path.isfile(os.path.join(path, "config.json"))


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    name = args.served_model_name
    if name is None:
        name = os.path.basename(os.path.normpath(args.model_path))
    return ServeSettings(
        model_name=name, media_root=args.media_root, allow_remote_media=args.allow_remote_media,
        max_request_bytes=int(args.max_request_mb * 2**20), max_images=args.max_images, max_videos=args.max_videos,
        max_frames=args.max_frames, max_tokens=args.max_tokens, max_concurrency=args.max_concurrency,
        max_seq_len=args.max_seq_len)


def problems(args: argparse.Namespace, settings: ServeSettings) -> List[str]:
    """Everything wrong with the command line, before any model work."""
    from megatron_vita.config.features import enabled_features

    out = list(settings.problems())
    if not os.path.isdir(args.model_path):
        out.append(f"--model_path {args.model_path}: no such directory")
    elif is_hf_dir(args.model_path):
        given = [flag for dest, flag in _MEGATRON_ONLY.items() if getattr(args, dest) is not None]
        given += ["--" + f for f in enabled_features(args)]
        out += [f"{flag} applies to Megatron checkpoints; --model_path {args.model_path} is an HF directory "
                "(transformers runs it)" for flag in given]
    if not 0 <= args.port <= 65535:
        out.append(f"--port must be in 0..65535, got {args.port}")
    for flag, value in (("--tp", args.tp), ("--pp", args.pp), ("--cp", args.cp), ("--prefill-chunk", args.prefill_chunk)):
        if value is not None and value < 1:
            out.append(f"{flag} must be >= 1, got {value}")
    return out


def open_generator(args: argparse.Namespace):
    """The Generator for `--model_path`, by what the directory holds (heavy imports here only)."""
    backend = getattr(args, "backend", None)
    if is_hf_dir(args.model_path):
        from megatron_vita.inference.hf_generator import HFGenerator

        return HFGenerator(args.model_path, backend=backend, dtype=args.dtype, tokenizer=args.tokenizer)
    from megatron_vita.config.features import enabled_features
    from megatron_vita.config.parallel import ParallelConfig
    from megatron_vita.inference.engine import MegatronGenerator

    layout = {"tensor_model_parallel_size": args.tp or 1, "pipeline_model_parallel_size": args.pp or 1,
              "context_parallel_size": args.cp or 1}
    if args.cp_algo:
        layout["context_parallel_algo"] = args.cp_algo
    return MegatronGenerator(args.model_path, ParallelConfig(**layout), tokenizer=args.tokenizer, backend=backend,
                             features=tuple(enabled_features(args)), prefill_chunk=args.prefill_chunk,
                             dtype=args.dtype)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a taken port fails in one line at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"--host {host} --port {port}: cannot listen there: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(generator, settings: ServeSettings, sock: socket.socket, log_level: str = "info") -> None:
    """Run the server on `sock` until interrupted; the address is printed on stderr first."""
    import uvicorn

    from megatron_vita.serve.app import create_app

    config = uvicorn.Config(create_app(generator, settings), log_level=log_level, timeout_graceful_shutdown=5)
    host, port = sock.getsockname()[:2]
    print(f"serve: {settings.model_name} on http://{host}:{port}/v1 (and PUT /api for the original "
          "Long-VITA client)", file=sys.stderr, flush=True)
    uvicorn.Server(config).run(sockets=[sock])


def run(args: argparse.Namespace) -> int:
    from megatron_vita.config.parallel import ConfigError

    settings = settings_from_args(args)
    found = problems(args, settings)
    if found:
        raise ConfigError(found)
    leader = int(os.environ.get("RANK", "0")) == 0
    sock = bind(args.host, args.port) if leader else None
    try:
        generator = open_generator(args)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    try:
        if leader:  # followers: the engine ran them until rank 0 closed the generator
            serve(generator, settings, sock, args.log_level)
    finally:
        close = getattr(generator, "close", None)
        if close is not None:
            close()
    return 0
