"""torch.distributed start-up on the active backend, from torchrun or self-spawned.

`init_distributed` reads torchrun's environment (or makes a 1-process group); `spawn` starts
N local ranks itself (torch.multiprocessing, spawn context) and returns each rank's result.
`spawn` is what `megatron-vita verify` uses when not under torchrun, and what the multi-process
tests use: a rank that fails or a collective that hangs past `timeout` fails the whole call
with every rank's traceback, instead of hanging a terminal or CI.

Results cross the process boundary as plain bytes (`torch.save` in the rank, `torch.load` on
the CPU in the launcher), never as tensors on the multiprocessing queue: torch's queue pickler
shares a tensor's storage through a file descriptor that the sending process serves, so a rank
that exits before the launcher unpickles its result made the launcher fail with
`FileNotFoundError` (seen: 1 `verify` in 4 at TP2 PP2).
"""
from __future__ import annotations

import io
import os
import queue as queue_mod
import signal
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_vita.cli import skip_exit_collection
from megatron_vita.platform.backend import Platform, activate


def rendezvous_server(timeout_minutes: int = 30) -> "dist.TCPStore":
    """The rendezvous store of a local run, listening on a port the kernel picks (port 0).

    Picking a free port and binding it later is a race: in between, any socket on the machine
    (gloo's own connections among them) may be given that port, and the run fails with
    EADDRINUSE. Binding port 0 in the store itself leaves no gap; ranks connect as clients."""
    return dist.TCPStore("127.0.0.1", 0, None, True, timedelta(minutes=timeout_minutes), wait_for_workers=False)


def init_distributed(platform: Optional[Platform] = None, timeout_minutes: int = 30,
                     store: Optional["dist.Store"] = None) -> Platform:
    """Initialise the default process group for this process (idempotent): through `store` when
    given (the local launcher's), else torchrun's environment, else as a world of one."""
    platform = platform or activate()
    if dist.is_initialized():
        return platform
    if store is None and "RANK" not in os.environ:
        store = rendezvous_server(timeout_minutes)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(store.port))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    platform.set_device(local_rank)
    dist.init_process_group(
        backend=platform.dist_backend,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timedelta(minutes=timeout_minutes),
        store=store,
    )
    return platform


def _die_with_parent() -> None:
    """Linux: a rank whose launcher is killed (kill -9, OOM) dies too instead of hanging in a collective."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _worker(rank, world_size, port, backend, threads, fn, args, queue, features=()):
    _die_with_parent()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, False, timedelta(minutes=10))
        init_distributed(activate(backend, features=features), timeout_minutes=10, store=store)
        # Serialised here, so that a result torch.save cannot write is this rank's reported error.
        result = _to_bytes(fn(rank, world_size, *args))
        dist.barrier()
        queue.put((rank, "ok", result))
    except BaseException:  # report everything, including KeyboardInterrupt in a child
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        skip_exit_collection()


def _to_bytes(result: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(result, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    # Written by this launcher's own ranks (as trusted as the pickles the queue itself carries);
    # tensors land on the CPU so that the launcher never initialises an accelerator.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


class DistributedRunError(RuntimeError):
    pass


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600,
          backend: Optional[str] = None, threads: int = 1, features: Sequence[str] = ()) -> List[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` local ranks; return results by rank.

    `fn` and `args` must be picklable (module-level function); results must be savable by
    `torch.save`, and their tensors come back on the CPU. Raises DistributedRunError with
    every failing rank's traceback, or when `timeout` seconds pass (all ranks are killed).
    `features`: kernel flag names every rank's `platform.activate` applies; a backend that
    cannot run them is refused here (ConfigError, one line per flag) before any rank starts.
    """
    import torch.multiprocessing as mp

    from megatron_vita.platform.backend import resolve_backend
    from megatron_vita.config.features import normalize
    from megatron_vita.platform.features import feature_problems

    features = tuple(dict.fromkeys(normalize(f) for f in features))
    problems = feature_problems(resolve_backend(backend), features)
    if problems:
        from megatron_vita.config.parallel import ConfigError

        raise ConfigError(problems)

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    server = rendezvous_server()  # held by the launcher until every rank is gone
    port = server.port
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, threads, fn, args, q, features),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if errors:
                    break
                raise DistributedRunError(
                    f"distributed run timed out after {timeout:.0f}s; ranks finished: {sorted(results)}; "
                    f"failed: {sorted(errors)}" + _format_errors(errors))
            try:
                rank, status, payload = q.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and r not in results and r not in errors]
                if dead:
                    # A rank died without reporting (segfault, OOM kill): peers would hang.
                    for r in dead:
                        errors[r] = f"process exited with code {procs[r].exitcode} without a report"
                    break
                continue
            if status == "ok":
                results[rank] = _from_bytes(payload)
            else:
                errors[rank] = payload
            if errors:
                # Peers of a failed rank usually block in a collective: collect what else
                # arrives shortly, then stop waiting.
                deadline = min(deadline, time.monotonic() + 3.0)
    finally:
        # Ranks that reported success get time to exit cleanly; after a failure or a timeout
        # the rest are stuck in a collective or hung, and waiting for them only delays the error.
        grace = 5 if len(results) == world_size else 0.5
        for p in procs:
            p.join(timeout=grace)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise DistributedRunError(f"{len(errors)} of {world_size} ranks failed" + _format_errors(errors))
    return [results[r] for r in range(world_size)]


def _format_errors(errors) -> str:
    return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
