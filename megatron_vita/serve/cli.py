"""`megatron-vita serve`: the OpenAI-compatible server over one Long-VITA model.

Owns the command line: flags, their checks (all before the model loads, one line per problem),
and the uvicorn run. What `--model_path` is and which Generator runs it are decided as `infer`
decides them (inference/cli.py: an HF directory -> HFGenerator in this process; a Megatron
checkpoint -> the megatron-core engine's MegatronGenerator on TP*PP*CP ranks, with the tokenizer
its training recorded unless `--tokenizer` is given), so both commands load a model the same way.

The listening socket is bound before the model loads: a taken port fails at once, in one line.
Under torchrun only rank 0 serves HTTP; the other ranks build their part of the model and
`follow()` rank 0's requests (MegatronGenerator) until rank 0 closes the generator.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import List, Optional, Tuple

from megatron_vita.serve.settings import DEFAULT_MAX_FRAMES, DEFAULT_MAX_TOKENS, ServeSettings


# On Ctrl-C / SIGTERM the answers being generated may finish for this long (a second Ctrl-C
# stops at once); then their connections are closed.
GRACEFUL_SHUTDOWN_S = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_vita.config.dtypes import DTYPES

    parser.add_argument("--model_path", "--model-path", dest="model_path", required=True, metavar="DIR",
                        help="a Long-VITA HF directory (transformers) or a Megatron checkpoint (megatron-core ranks)")
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="tokenizer directory (default: the HF directory's, or the one a Megatron checkpoint's "
                        "training recorded)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients send (default: the --model_path directory's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed at start)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="compute dtype (default fp32)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g = parser.add_argument_group("media and limits (a request over a limit gets a 4xx naming the flag)")
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
                   help="prompt + answer tokens (default: the model's position limit)")
    g.add_argument("--max-concurrency", type=int, default=64,
                   help="requests held at once, generating (one at a time) or waiting in arrival order; "
                   "more are refused with 429")
    from megatron_vita.inference.cli import add_model_path_arguments

    add_model_path_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    name = args.served_model_name
    if name is None:
        name = os.path.basename(os.path.normpath(args.model_path))
    return ServeSettings(
        model_name=name, media_root=args.media_root, allow_remote_media=args.allow_remote_media,
        max_request_bytes=int(args.max_request_mb * 2**20), max_images=args.max_images, max_videos=args.max_videos,
        max_frames=args.max_frames, max_tokens=args.max_tokens, max_concurrency=args.max_concurrency,
        max_seq_len=args.max_seq_len)


def problems(args: argparse.Namespace, settings: ServeSettings) -> Tuple[Optional[str], Optional[str], List[str]]:
    """(kind, tokenizer, problems): everything wrong with the command line, before any model work;
    --model_path and its flags with `infer`'s rules (flags of the other path are refused, not ignored)."""
    from megatron_vita.inference.cli import model_problems

    kind, tokenizer, out = model_problems(args)
    out = list(settings.problems()) + out
    if not 0 <= args.port <= 65535:
        out.append(f"--port must be in 0..65535, got {args.port}")
    return kind, tokenizer, out


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads."""
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

    config = uvicorn.Config(create_app(generator, settings), log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    host, port = sock.getsockname()[:2]
    print(f"serve: {settings.model_name} on http://{host}:{port}/v1 (and PUT /api for the original "
          "Long-VITA client)", file=sys.stderr, flush=True)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if server.started and server.should_exit:
        # Stopped by Ctrl-C / SIGTERM. uvicorn re-raises the signal it captured once it has shut
        # down, but not on every path (a run measured exit 0 instead of 130): the command ends
        # as interrupted either way ("megatron-vita: interrupted", exit 130).
        raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from megatron_vita.config.parallel import ConfigError
    from megatron_vita.inference.cli import make_generator

    settings = settings_from_args(args)
    kind, tokenizer, found = problems(args, settings)
    if found:
        raise ConfigError(found)
    leader = int(os.environ.get("RANK", "0")) == 0
    sock = bind(args.host, args.port) if leader else None
    print(f"serve: {kind} path: loading {args.model_path}", file=sys.stderr, flush=True)
    try:
        generator = make_generator(kind, args, tokenizer)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    try:
        if leader:
            serve(generator, settings, sock, args.log_level)
        else:  # a torchrun rank other than 0: answer rank 0's requests until it closes
            # The Ctrl-C / SIGTERM that torchrun passes to every process is rank 0's to act on:
            # a follower that left now would leave rank 0's close() broadcasting to nobody.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            generator.follow()
    finally:
        close = getattr(generator, "close", None)
        if close is not None:
            close()
    return 0
