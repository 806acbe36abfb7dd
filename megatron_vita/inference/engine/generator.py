"""`MegatronGenerator`: the `Generator` protocol over megatron-core ranks, and the ranks' loop.

Owns how a request reaches every rank and how its answer comes back:
 - ranks: TP*PP*CP processes. Without torchrun the generator spawns them itself
   (`platform.spawn`, run in a background thread for the generator's lifetime) and talks to
   rank 0 over a pipe carrying only plain Python values (requests, text pieces, token ids,
   error lines), never tensors. Under torchrun (WORLD_SIZE set) the current processes are the
   ranks: rank 0's generator drives in-process; the others (`is_driver` False) either call
   generate / stream in lock-step with it (rank 0's request is answered, on every rank) or
   `follow()` until rank 0 closes.
 - rank 0 builds the prompt with the training code (`inference.prompt.build_prompt`), then
   broadcasts a header over a control group (gloo, with a long timeout, so idle followers do
   not time out between requests) and the prompt tensors (ids, pixels, sampling numbers) over
   the default group; every rank then runs `RankEngine.generate` and the chosen tokens reach
   rank 0 by broadcast, where they are detokenized (`inference.text`, shared with the HF path).
 - ranks stay alive across requests; `close()` stops them (followers leave their loop).
"""
from __future__ import annotations

import os
import threading
import traceback
from datetime import timedelta
from typing import Iterator, List, Optional, Sequence, Tuple

from megatron_vita.config.parallel import ConfigError, ParallelConfig
from megatron_vita.inference.api import GenerationRequest, GenerationResult

_OP_STOP, _OP_GENERATE = 0, 1
_IDLE = timedelta(days=365)  # how long followers may wait for the next request


def checkpoint_kind(path: str) -> str:
    """'hf' for a directory with config.json and weights, else 'megatron' (a save root / iteration)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    return "megatron"


def resolve(checkpoint: str, par: ParallelConfig, tokenizer: Optional[str]):
    """(model config, kind, tokenizer dir) of a checkpoint, every problem raised as one ConfigError."""
    from megatron_vita.checkpoint.sources import open_source

    if not os.path.isdir(checkpoint):
        raise ConfigError([f"--model_path {checkpoint}: no such directory"])
    kind = checkpoint_kind(checkpoint)
    try:
        source = open_source(kind, checkpoint)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise ConfigError([f"--model_path {checkpoint}: {e}"]) from None
    cfg = source.cfg
    if hasattr(source, "close"):
        source.close()
    problems = par.problems(cfg, par.model_parallel_size) if hasattr(par, "problems") else []
    tok = tokenizer or (checkpoint if kind == "hf" else recorded_tokenizer(checkpoint))
    if tok is None:
        problems.append(f"--model_path {checkpoint} records no tokenizer: pass --tokenizer DIR")
    elif not os.path.isdir(tok):
        problems.append(f"--tokenizer {tok}: no such directory")
    else:  # checked here, not on rank 0: a wrong tokenizer is one line before any rank starts
        from megatron_vita.data.template import load_tokenizer
        from megatron_vita.inference.prompt import tokenizer_problems

        try:
            problems += tokenizer_problems(load_tokenizer(tok), cfg, f"tokenizer {tok}")
        except (OSError, ValueError) as e:
            problems.append(f"--tokenizer {tok}: {e}")
    if problems:
        raise ConfigError(problems)
    return cfg, kind, tok


def recorded_tokenizer(checkpoint: str) -> Optional[str]:
    """The tokenizer a Megatron checkpoint was trained with (`--tokenizer` in its stored training
    arguments), or None (released checkpoints store none)."""
    from megatron_vita.checkpoint.megatron_layout import resolve_iteration_dir
    from megatron_vita.checkpoint.safe_load import load_weights_only

    common = os.path.join(resolve_iteration_dir(checkpoint)[0], "common.pt")
    if not os.path.isfile(common):
        return None
    args = load_weights_only(common).get("args")
    tok = args.get("tokenizer") if isinstance(args, dict) else getattr(args, "tokenizer", None)
    return tok if isinstance(tok, str) else None


# ---- the ranks ---------------------------------------------------------------------------------
class _Ranks:
    """The state every rank holds: its engine and the control group requests arrive on."""

    def __init__(self, cfg_dict, kind, path, par, dtype, prefill_chunk):
        import torch.distributed as dist

        from megatron_vita.config.model import ModelConfig
        from megatron_vita.inference.engine.runner import RankEngine

        self.cfg = ModelConfig.from_dict(cfg_dict)
        self.engine = RankEngine(self.cfg, par, (kind, path), dtype, prefill_chunk)
        self.control = dist.new_group(backend="gloo", timeout=_IDLE)
        self.stopped = False  # rank 0 has closed: nothing more will be broadcast

    def receive(self) -> Optional[Tuple]:
        """Followers: the next request's tensors from rank 0, or None when it closes."""
        import torch
        import torch.distributed as dist

        from megatron_vita.inference.engine.sampling import Sampling

        if self.stopped:
            return None
        header = torch.zeros(3, dtype=torch.long)
        dist.broadcast(header, src=0, group=self.control)
        if int(header[0]) == _OP_STOP:
            self.stopped = True
            return None
        return self._tensors(int(header[1]), int(header[2]), None, None, None, Sampling)

    def send(self, ids: List[int], pixels, sampling) -> Tuple:
        """Rank 0: a request's tensors to every rank (returns them as the followers get them)."""
        import torch
        import torch.distributed as dist

        from megatron_vita.inference.engine.sampling import Sampling

        n = 0 if pixels is None else int(pixels.shape[0])
        dist.broadcast(torch.tensor([_OP_GENERATE, len(ids), n]), src=0, group=self.control)
        return self._tensors(len(ids), n, ids, pixels, sampling, Sampling)

    def _tensors(self, length, tiles, ids, pixels, sampling, Sampling):
        import torch
        import torch.distributed as dist

        device = self.engine.device
        size = self.cfg.vision.image_size
        t_ids = torch.tensor(ids, dtype=torch.long, device=device) if ids is not None else \
            torch.empty(length, dtype=torch.long, device=device)
        dist.broadcast(t_ids, src=0)
        t_px = None
        if tiles:
            t_px = pixels.to(device=device, dtype=torch.float32).contiguous() if pixels is not None else \
                torch.empty(tiles, 3, size, size, dtype=torch.float32, device=device)
            dist.broadcast(t_px, src=0)
        t_s = sampling.pack().to(device) if sampling is not None else torch.empty(7, dtype=torch.float64, device=device)
        dist.broadcast(t_s, src=0)
        return t_ids, t_px, Sampling.unpack(t_s.cpu())

    def stop(self) -> None:
        import torch
        import torch.distributed as dist

        if not self.stopped:
            dist.broadcast(torch.tensor([_OP_STOP, 0, 0]), src=0, group=self.control)
            self.stopped = True

    def follow(self) -> None:
        from megatron_vita.inference.text import stop_token_ids

        stops = stop_token_ids(self.cfg)
        while True:
            got = self.receive()
            if got is None:
                return
            ids, pixels, sampling = got
            self.engine.generate(ids, pixels, sampling, stops)


class _Driver:
    """A rank that answers: rank 0 builds prompts and broadcasts them; under torchrun the other
    ranks' generators receive the same request in lock-step and decode the same tokens."""

    def __init__(self, ranks: _Ranks, tokenizer_dir: str, leads: bool = True):
        from megatron_vita.data.template import load_tokenizer
        from megatron_vita.inference.text import stop_token_ids

        self.ranks, self.leads = ranks, leads
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.stops = stop_token_ids(ranks.cfg)

    def prepare(self, request: GenerationRequest):
        """(prompt length, ids, pixels, sampling) on every rank; the leader's prompt problems raise
        before anything is broadcast, so the other ranks never see a bad request."""
        from megatron_vita.inference.engine.sampling import Sampling
        from megatron_vita.inference.prompt import build_prompt, context_limit
        from megatron_vita.inference.text import new_token_budget

        if not self.leads:
            got = self.ranks.receive()
            if got is None:
                raise RuntimeError("rank 0 closed the generator: no request to follow")
            return got
        ids, pixels = build_prompt(request, self.tokenizer, self.ranks.cfg)
        sampling = Sampling.from_request(request)
        sampling.max_seq_len = None
        sampling.max_new_tokens = max(1, new_token_budget(request.sampling.max_new_tokens, len(ids),
                                                          context_limit(request, self.ranks.cfg)))
        return self.ranks.send(ids, pixels if pixels is not None and pixels.shape[0] else None, sampling)

    def run(self, request: GenerationRequest) -> Iterator[Tuple[str, object]]:
        """('piece', text) as tokens come, then ('done', GenerationResult)."""
        return self.answer(self.prepare(request))

    def answer(self, prepared) -> Iterator[Tuple[str, object]]:
        """The events of a request every rank has received (`prepare`)."""
        from megatron_vita.inference.text import IncrementalDetokenizer, detokenize, finish_reason

        t_ids, t_px, sampling = prepared
        detok = IncrementalDetokenizer(self.tokenizer)
        tokens: List[int] = []
        for token in self.ranks.engine.steps(t_ids, t_px, sampling, self.stops):
            tokens.append(token)
            piece = detok.push([token])
            if piece:
                yield "piece", piece
        tail = detok.finish()
        if tail:
            yield "piece", tail
        yield "done", GenerationResult(detokenize(self.tokenizer, tokens), tokens, finish_reason(tokens, self.stops),
                                       int(t_ids.shape[0]))


def serve_rank(rank: int, world: int, cfg_dict, kind, path, par, dtype, prefill_chunk, tokenizer_dir, conn):
    """Every spawned rank: build, then rank 0 answers the parent's requests, the others follow."""
    ranks = _Ranks(cfg_dict, kind, path, par, dtype, prefill_chunk)
    try:
        if rank != 0:
            ranks.follow()
            return None
        try:
            driver = _Driver(ranks, tokenizer_dir)
        except Exception as e:
            ranks.stop()
            conn.send(("error", None, str(e)))
            return None
        conn.send(("ready", None, ranks.engine.loaded_how))
        while True:
            msg = conn.recv()
            if msg[0] == "close":
                ranks.stop()
                return None
            _, req_id, request = msg
            try:
                prepared = driver.prepare(request)
            except (ValueError, FileNotFoundError, RuntimeError) as e:
                # Nothing was broadcast: the request is refused and the ranks keep serving. An
                # error after the broadcast is not caught: the ranks are out of step, the run ends.
                conn.send(("error", req_id, str(e)))
                continue
            for kind_, payload in driver.answer(prepared):
                conn.send((kind_, req_id, payload))
    finally:
        ranks.engine.close()


# ---- the user's side ---------------------------------------------------------------------------
class MegatronGenerator:
    """Generator over megatron-core ranks at layout `par` (see the module docstring)."""

    def __init__(self, checkpoint: str, par: ParallelConfig, tokenizer: Optional[str] = None, backend=None,
                 features: Sequence[str] = (), prefill_chunk: Optional[int] = None, dtype: str = "fp32",
                 start_timeout: float = 900):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ConfigError([f"--prefill-chunk must be >= 1, got {prefill_chunk}"])
        cfg, kind, tok = resolve(checkpoint, par, tokenizer)
        from megatron_vita.config.features import normalize
        from megatron_vita.platform.features import feature_problems
        from megatron_vita.platform.backend import resolve_backend

        features = tuple(dict.fromkeys(normalize(f) for f in features))
        problems = feature_problems(resolve_backend(backend), features)
        if problems:  # before any rank starts, one line per flag
            raise ConfigError(problems)
        self.model_config, self.par, self._lock = cfg, par, threading.Lock()
        self._requests = 0
        self._closed = False
        self.is_driver = True
        if os.environ.get("WORLD_SIZE"):
            self._start_torchrun(cfg, kind, checkpoint, par, dtype, prefill_chunk, tok, backend, features)
        else:
            self._start_spawned(cfg, kind, checkpoint, par, dtype, prefill_chunk, tok, backend, features,
                                start_timeout)

    def _start_torchrun(self, cfg, kind, path, par, dtype, prefill_chunk, tok, backend, features):
        """Every torchrun process builds its rank. Rank 0 drives; the others either call generate /
        stream in lock-step with it (their request argument is ignored: rank 0's is answered, and
        they return the same answer) or `follow()` until rank 0 closes (a server's other ranks)."""
        import torch.distributed as dist

        from megatron_vita import platform

        platform.init_distributed(platform.activate(backend, features=features))
        world = dist.get_world_size()
        if world != par.model_parallel_size:
            raise ConfigError([f"torchrun started {world} processes; inference needs exactly TP*PP*CP = "
                               f"{par.model_parallel_size} (no data parallelism)"])
        self._ranks = _Ranks(cfg.to_dict(), kind, path, par, dtype, prefill_chunk)
        self._conn = None
        self.is_driver = dist.get_rank() == 0
        self._driver = _Driver(self._ranks, tok, leads=self.is_driver)

    def follow(self) -> None:
        """Torchrun ranks other than 0: answer rank 0's requests until it closes (then closed)."""
        if self.is_driver:
            raise RuntimeError("rank 0 drives the generator; follow() is for the other torchrun ranks")
        if not self._closed:
            self._ranks.follow()
            self._ranks.engine.close()
            self._closed = True

    def _start_spawned(self, cfg, kind, path, par, dtype, prefill_chunk, tok, backend, features, timeout):
        import multiprocessing as mp

        from megatron_vita import platform

        parent, child = mp.get_context("spawn").Pipe()
        self._conn, self._error = parent, None

        def run():
            try:
                platform.spawn(serve_rank, par.model_parallel_size, cfg.to_dict(), kind, path, par, dtype,
                               prefill_chunk, tok, child, timeout=10 ** 9, backend=backend, features=features)
            except BaseException as e:  # reported by the next call on the user's side
                self._error = str(e)

        self._thread = threading.Thread(target=run, name="megatron-vita-ranks", daemon=True)
        self._thread.start()
        kind_, _, payload = self._receive(timeout)
        if kind_ == "error":
            self.close()
            raise RuntimeError(f"the engine did not start: {payload}")
        self.loaded_how = payload

    def _receive(self, timeout: Optional[float] = None):
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._conn.poll(0.2):
            if not self._thread.is_alive():
                raise RuntimeError(f"the engine's ranks stopped: {self._error or 'no report'}")
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"the engine's ranks did not answer within {timeout:.0f}s")
        return self._conn.recv()

    def _events(self, request: GenerationRequest) -> Iterator[Tuple[str, object]]:
        problems = request.problems()
        if problems:
            raise ConfigError(problems)
        if self._closed:
            raise RuntimeError("this MegatronGenerator is closed")
        with self._lock:
            if self._conn is None:
                events, finished = self._driver.run(request), False
                try:
                    for event in events:
                        yield event
                    finished = True
                finally:
                    if not finished:  # an abandoned stream: the followers run the request to its end
                        for _ in events:
                            pass
                return
            self._requests += 1
            req_id = self._requests
            self._conn.send(("generate", req_id, request))
            while True:
                kind, rid, payload = self._receive()
                if rid not in (req_id, None):
                    continue  # left over from a stream the caller abandoned
                if kind == "error":
                    raise ValueError(payload)
                yield kind, payload
                if kind == "done":
                    return

    def generate(self, request: GenerationRequest) -> GenerationResult:
        for kind, payload in self._events(request):
            if kind == "done":
                return payload
        raise RuntimeError("the engine ended a request without a result")

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        for kind, payload in self._events(request):
            if kind == "piece":
                yield payload
            elif kind == "done":
                return payload  # the exhausted stream's value: the result generate() gives

    def close(self) -> None:
        """Stop the ranks (idempotent). Under torchrun every rank calls it: rank 0's stops the
        others', which return once they have answered what rank 0 sent before."""
        if self._closed:
            return
        self._closed = True
        if self._conn is None:
            if self.is_driver:
                self._ranks.stop()
            else:
                self._ranks.follow()  # what rank 0 still sends, until its close
            self._ranks.engine.close()
            return
        try:
            if self._thread.is_alive():
                self._conn.send(("close",))
            self._thread.join(timeout=60)
        except (OSError, EOFError):
            traceback.print_exc()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
