"""Deterministic sample order and the packing planner, with a small exact-resume state.

Owns the global stream of packed sequences, which is the same on every data-parallel rank:

1. `MixtureOrder`: per dataset file, the records are shuffled with the seed (keyed by the
   file's path, so editing other recipe lines does not change it) and used = min(int(ratio*N),
   cap) of them are selected (index k -> permutation[k % N]); the selections of all files are
   concatenated and shuffled again per epoch (seed, epoch). Position p of the infinite stream
   is (epoch p // M, entry perm_epoch[p % M]): random access, nothing replayed.
2. `Planner`: walks the stream, asks an evaluator for each record's document length (headers
   and probes only, computed a few records ahead on a thread pool; consumed strictly in order,
   so the result does not depend on thread timing), applies the oversize policy, and feeds the
   Packer. Every rank plans the full stream, so the packed sequence g is identical everywhere;
   rank r takes micro-batches r, r + dp, ... Its state (stream position, packer buffers of
   indices, counters) is snapshot at every round of dp micro-batches: resuming loads the
   snapshot in O(1), and a different data-parallel size continues the same stream exactly.
"""
from __future__ import annotations

import collections
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from megatron_vita.data.packing import Packer, SampleRef
from megatron_vita.data.recipe import DatasetEntry
from megatron_vita.data.sample import DataStats

# evaluate(ds, rec) -> (ref or None, outcome, location, message)
#   outcome: ok | truncated | fewer_frames | oversize | bad:<reason>
Evaluation = Tuple[Optional[SampleRef], str, str, str]


def used_count(n: int, entry: DatasetEntry) -> int:
    """Records a dataset contributes per epoch: min(int(ratio * N), cap)."""
    if n <= 0 or entry.ratio <= 0:
        return 0
    used = int(n * entry.ratio)
    return used if entry.cap is None else min(used, entry.cap)


class MixtureOrder:
    """Random access to the infinite, epoch-reshuffled stream of (dataset, record) pairs."""

    def __init__(self, sizes: Sequence[int], entries: Sequence[DatasetEntry], seed: int):
        self.seed = seed
        ds, rec = [], []
        self.used = []
        for i, (n, e) in enumerate(zip(sizes, entries)):
            used = used_count(n, e)
            self.used.append(used)
            if used == 0:
                continue
            perm = np.random.default_rng([seed, zlib.crc32(e.path.encode())]).permutation(n)
            rec.append(perm[np.arange(used) % n].astype(np.int64 if n >= 2 ** 31 else np.int32))
            ds.append(np.full(used, i, dtype=np.int32))
        if not rec:
            raise ValueError("the recipe selects no records (every enabled dataset is empty)")
        self.ds = np.concatenate(ds)
        # int32 where it fits: 17M records cost ~70 MB per array instead of ~140 MB.
        self.rec = np.concatenate(rec)
        self.total = len(self.rec)
        self._epoch = -1
        self._perm = None

    def at(self, position: int) -> Tuple[int, int]:
        epoch, j = divmod(position, self.total)
        if epoch != self._epoch:
            perm = np.random.default_rng([self.seed, 0x5EED, epoch]).permutation(self.total)
            self._perm = perm.astype(np.int32) if self.total < 2 ** 31 else perm
            self._epoch = epoch
        g = self._perm[j]
        return int(self.ds[g]), int(self.rec[g])


class Planner:
    """Turns the record stream into packed sequences (lists of SampleRefs)."""

    def __init__(self, order: MixtureOrder, names: Sequence[str], evaluate: Callable[[int, int], Evaluation],
                 packer: Packer, report_first: int = 5, threads: int = 2, lookahead: int = 32):
        self.order = order
        self.names = list(names)
        self.evaluate = evaluate
        self.packer = packer
        self.stats = DataStats(self.names, report_first)
        self.position = 0
        self.packs_emitted = 0
        self._ready: collections.deque = collections.deque()
        self._threads = threads
        self._lookahead = max(1, lookahead)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="vita-plan") if threads > 0 else None

    # ---- lookahead -----------------------------------------------------------------------
    def _submit(self, position: int):
        ds, rec = self.order.at(position)
        if self._pool is None:
            return position, None, self.evaluate(ds, rec), ds
        return position, self._pool.submit(self.evaluate, ds, rec), None, ds

    def _next_evaluation(self) -> Tuple[int, Evaluation]:
        if not self._ready or self._ready[0][0] != self.position:
            self._ready.clear()
        want = self._lookahead if self._pool is not None else 1
        nxt = self._ready[-1][0] + 1 if self._ready else self.position
        while len(self._ready) < want:
            self._ready.append(self._submit(nxt))
            nxt += 1
        _, fut, result, ds = self._ready.popleft()
        self.position += 1
        return ds, (fut.result() if fut is not None else result)

    # ---- the stream ------------------------------------------------------------------------
    def next_pack(self) -> List[SampleRef]:
        while True:
            ds, (ref, outcome, location, message) = self._next_evaluation()
            name = self.names[ds]
            self.stats.add(name, "seen")
            if outcome.startswith("bad:"):
                self.stats.bad(name, outcome[4:], location, message)
                continue
            if ref is None:
                self.stats.add(name, outcome)  # "oversize": dropped, counted, not bad
                continue
            if outcome != "ok":
                self.stats.add(name, outcome)
            self.stats.add(name, "used")
            self.stats.add(name, "tokens", ref[2])
            packs = self.packer.add(ref)
            if packs:
                self.packs_emitted += 1
                return packs[0]

    def state_dict(self) -> dict:
        return {"position": self.position, "packs_emitted": self.packs_emitted,
                "packer": self.packer.state_dict(), "stats": self.stats.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.position = int(d["position"])
        self.packs_emitted = int(d["packs_emitted"])
        self.packer.load_state_dict(d["packer"])
        self.stats.load_state_dict(d["stats"])
        self._ready.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
