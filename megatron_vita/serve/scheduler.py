"""One model, many clients: the FIFO queue in front of the Generator.

Owns who generates when. A Generator answers one request at a time, so one worker thread owns
it and takes admitted requests strictly in arrival order (a `queue.Queue`); at most
`--max-concurrency` requests are held at once (generating or waiting) and the next one is
refused with 429 instead of piling up without bound. A request's slot is freed when its
generation ends; a client that leaves cancels its job: a waiting job is skipped, and a
streaming one stops between two text pieces (its iterator is closed, so the Generator's own
clean-up runs). The media files of a job are removed only when its generation is over, since
the worker may still be reading them after the client has gone.

Results cross from the worker thread to the event loop with `call_soon_threadsafe` onto an
`asyncio.Queue` per job: ("piece", text) for streams, then ("done", GenerationResult) or
("error", exception).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from megatron_vita.inference.api import GenerationRequest, GenerationResult
from megatron_vita.serve.settings import ApiError

log = logging.getLogger("megatron_vita.serve")


@dataclass
class Job:
    request: GenerationRequest
    stream: bool
    loop: asyncio.AbstractEventLoop
    cleanup: Optional[Callable[[], None]] = None
    events: "asyncio.Queue" = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        """The client is gone: skip the job if it waits, stop it between pieces if it runs."""
        self.cancelled.set()

    def _post(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop closed (server shutting down): nobody is listening
            self.cancelled.set()


class Scheduler:
    """Runs jobs on `generator` one at a time, first come first served."""

    def __init__(self, generator, max_concurrency: int):
        self.generator = generator
        self.max_concurrency = max_concurrency
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._lock = threading.Lock()
        self._held = 0  # admitted and not finished: waiting + running
        self._running = False
        self.counts: Dict[str, int] = {"completed": 0, "cancelled": 0, "failed": 0, "refused_busy": 0}
        self._thread = threading.Thread(target=self._work, name="megatron-vita-generate", daemon=True)
        self._thread.start()

    # -- the event loop's side -----------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Admit `job` at the back of the queue, or refuse it (429) when the server is full."""
        with self._lock:
            if self._held >= self.max_concurrency:
                self.counts["refused_busy"] += 1
                raise ApiError(429, f"the server already holds {self._held} requests, its limit --max-concurrency "
                               f"{self.max_concurrency}; retry later", code="server_busy")
            self._held += 1
        self._queue.put(job)

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            held, running, counts = self._held, self._running, dict(self.counts)
        return {"running": int(running), "waiting": held - int(running), "max_concurrency": self.max_concurrency,
                **counts}

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker after the job it runs (waiting jobs are cancelled)."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                self._finish(job, "cancelled")
        self._queue.put(None)
        self._thread.join(timeout)

    # -- the worker thread ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
                continue
            with self._lock:
                self._running = True
            outcome = "failed"
            try:
                outcome = self._run(job)
            except BaseException as e:  # reported to the client; the worker keeps serving
                if not isinstance(e, (ValueError, FileNotFoundError, ApiError)):
                    log.exception("generation failed")
                job._post("error", e)
            finally:
                with self._lock:
                    self._running = False
                self._finish(job, outcome)

    def _run(self, job: Job) -> str:
        """Streams every answer, so that a client that leaves stops its generation at the next
        piece, streaming or not; a non-streaming client gets only the result at the end."""
        pieces = self.generator.stream(job.request)
        result: Optional[GenerationResult] = None
        try:
            while True:
                if job.cancelled.is_set():
                    return "cancelled"
                try:
                    piece = next(pieces)
                except StopIteration as stop:
                    # The exhausted stream's value: the finish reason and token counts (api.Generator).
                    if not isinstance(stop.value, GenerationResult):
                        raise TypeError(f"{type(self.generator).__name__}.stream() ended without returning its "
                                        "GenerationResult (inference.api.Generator)") from None
                    result = stop.value
                    break
                if job.stream:
                    job._post("piece", piece)
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        job._post("done", result)
        return "completed"

    def _finish(self, job: Job, outcome: str) -> None:
        try:
            if job.cleanup is not None:
                job.cleanup()
        finally:
            with self._lock:
                self._held -= 1
                self.counts[outcome] += 1
