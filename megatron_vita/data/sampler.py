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

A stream that cannot fill a sequence ends with `UnusableDataError` (one line) instead of being
walked forever: when a whole epoch held no usable record (every record bad or longer than the
sequence), when `STALL_LIMIT` consecutive records were unusable (huge datasets), or when the
bad-sample limit is exceeded before anything was usable. With `max_fraction` the planner also
applies the recipe's bad-sample limit record by record, so it holds before any batch exists.
"""
from __future__ import annotations

import collections
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from megatron_vita.data.packing import Packer, SampleRef
from megatron_vita.data.recipe import DatasetEntry
from megatron_vita.data.sample import DataError, DataStats

# evaluate(ds, rec) -> (ref or None, outcome, location, message)
#   outcome: ok | truncated | fewer_frames | oversize | bad:<reason>
Evaluation = Tuple[Optional[SampleRef], str, str, str]

# Consecutive unusable records after which a stream is declared unusable even before a whole
# epoch was walked: if usable records existed at a rate of 1 in 1000, 10000 in a row would
# happen with probability e^-10, and such a stream is not worth training on anyway.
STALL_LIMIT = 10_000


class UnusableDataError(DataError):
    """The stream yields nothing to train on; the message is one line saying why."""


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
                 packer: Packer, report_first: int = 5, threads: int = 2, lookahead: int = 32,
                 max_fraction: Optional[float] = None, min_samples: int = 0):
        self.order = order
        self.max_fraction, self.min_samples = max_fraction, min_samples
        # Unusable records since the last usable one: counts by outcome and the first message.
        # Transient (not in the state): after a resume the detection merely starts afresh.
        self._stall: collections.Counter = collections.Counter()
        self._stall_first = ""
        # The epoch being walked: whether this planner saw it from its start, and its outcomes.
        self._epoch = (-1, False, collections.Counter(), False)  # (epoch, from start, counts, usable)
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
            position = self.position
            ds, (ref, outcome, location, message) = self._next_evaluation()
            name = self.names[ds]
            self.stats.add(name, "seen")
            self._track_epoch(position, ref is not None, outcome)
            if ref is None:
                if outcome.startswith("bad:"):
                    self.stats.bad(name, outcome[4:], location, message)
                else:
                    self.stats.add(name, outcome)  # "oversize": dropped, counted, not bad
                self._stall[outcome] += 1
                self._stall_first = self._stall_first or f"{location}: {message}"
                self._check_unusable(outcome.startswith("bad:"))
                continue
            self._stall.clear()
            self._stall_first = ""
            if outcome != "ok":
                self.stats.add(name, outcome)
            self.stats.add(name, "used")
            self.stats.add(name, "tokens", ref[2])
            packs = self.packer.add(ref)
            if packs:
                self.packs_emitted += 1
                return packs[0]

    # ---- a stream with nothing to train on ------------------------------------------------
    def _track_epoch(self, position: int, usable: bool, outcome: str) -> None:
        epoch, j = divmod(position, self.order.total)
        if epoch != self._epoch[0]:
            self._epoch = (epoch, j == 0, collections.Counter(), False)
        _, whole, counts, was_usable = self._epoch
        counts[outcome] += 1
        self._epoch = (epoch, whole, counts, was_usable or usable)
        if whole and j == self.order.total - 1 and not (was_usable or usable):
            raise UnusableDataError(self._explain(counts, f"all {self.order.total} records of the recipe's selection"))

    def _check_unusable(self, bad: bool) -> None:
        n = sum(self._stall.values())
        if n >= STALL_LIMIT:
            raise UnusableDataError(self._explain(self._stall, f"{n} consecutive records of the stream"))
        if not bad or self.max_fraction is None:
            return
        seen, nbad = self.stats.total("seen"), self.stats.bad_total()
        if seen >= max(self.min_samples, 1) and nbad / seen > self.max_fraction:
            if self.stats.total("used") == 0:
                raise UnusableDataError(self._explain(self._stall, f"the first {seen} records of the stream",
                                                      f"; bad_samples.max_fraction {self.max_fraction:.2%} exceeded"))
            self.stats.check_fraction(self.max_fraction, self.min_samples)

    def _explain(self, counts, scope: str, extra: str = "") -> str:
        """One line: why nothing in `scope` can be trained on, by outcome, with the first example."""
        bad = {k[4:]: v for k, v in counts.items() if k.startswith("bad:")}
        long = sum(v for k, v in counts.items() if not k.startswith("bad:"))
        seq = self.packer.seq_length
        if not bad:
            why = f"every document is longer than the sequence length {seq} ({scope})"
        else:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(bad.items()))
            why = f"no usable record in {scope}: {sum(bad.values())} bad ({reasons})"
            if long:
                why += f", {long} longer than the sequence length {seq}"
        return f"{why}{extra}; first: {self._stall_first}"

    def state_dict(self) -> dict:
        return {"position": self.position, "packs_emitted": self.packs_emitted,
                "packer": self.packer.state_dict(), "stats": self.stats.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.position = int(d["position"])
        self.packs_emitted = int(d["packs_emitted"])
        self.packer.load_state_dict(d["packer"])
        self.stats.load_state_dict(d["stats"])
        self._ready.clear()
        self._stall.clear()
        self._stall_first = ""
        self._epoch = (-1, False, collections.Counter(), False)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
