"""Choosing the next token from a logits row, as transformers' `generate` does, and the numbers
of a request that every rank must agree on (sent as one tensor: `Sampling.pack` / `unpack`).

Order of the logits processors is transformers': repetition penalty (on the prompt and the
answer so far), then temperature, top-k, top-p, then a draw from the softmax with the request's
seeded generator; greedy (temperature 0) is the argmax after the penalty, so greedy answers
equal those of the HF path on the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class Sampling:
    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    max_seq_len: Optional[int] = None  # prompt + answer

    @classmethod
    def from_request(cls, request) -> "Sampling":
        s = request.sampling
        return cls(s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.seed,
                   request.max_seq_len)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def budget(self, prompt_tokens: int) -> int:
        """Answer tokens allowed: max_new_tokens, cut by max_seq_len (at least one)."""
        if self.max_seq_len is None:
            return self.max_new_tokens
        return max(1, min(self.max_new_tokens, self.max_seq_len - prompt_tokens))

    def pack(self) -> torch.Tensor:
        """float64 [7] (ints are exact in float64 below 2**53); -1 for a missing seed / max_seq_len."""
        return torch.tensor([self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.repetition_penalty,
                             -1 if self.seed is None else self.seed,
                             -1 if self.max_seq_len is None else self.max_seq_len], dtype=torch.float64)

    @classmethod
    def unpack(cls, t: torch.Tensor) -> "Sampling":
        v = t.tolist()
        return cls(int(v[0]), v[1], v[2], int(v[3]), v[4], None if v[5] < 0 else int(v[5]),
                   None if v[6] < 0 else int(v[6]))


def processed_logits(logits: torch.Tensor, history: Sequence[int], sampling: Sampling) -> torch.Tensor:
    """The logits [V] the token is drawn from (greedy: the argmax of them), fp32 on the host."""
    x = logits.float().cpu().clone()
    if sampling.repetition_penalty != 1.0 and len(history):
        seen = torch.tensor(sorted(set(history)), dtype=torch.long)
        seen = seen[seen < x.numel()]
        picked = x[seen]
        x[seen] = torch.where(picked < 0, picked * sampling.repetition_penalty, picked / sampling.repetition_penalty)
    if sampling.greedy:
        return x
    x = x / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(x, min(sampling.top_k, x.numel())).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if sampling.top_p < 1.0:
        # transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p, keep >= 1 token.
        order = torch.argsort(x, descending=False)
        cum = torch.softmax(x[order], dim=-1).cumsum(-1)
        drop = cum <= 1 - sampling.top_p
        drop[-1] = False
        x[order[drop]] = float("-inf")
    return x


def choose(logits: torch.Tensor, history: Sequence[int], sampling: Sampling,
           generator: Optional[torch.Generator] = None) -> int:
    """The next token from logits [V] given the tokens so far (prompt + answer)."""
    x = processed_logits(logits, history, sampling)
    if sampling.greedy:
        return int(torch.argmax(x))
    return int(torch.multinomial(torch.softmax(x, dim=-1), 1, generator=generator))
