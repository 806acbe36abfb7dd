"""EMULATION of `torch_npu.npu_fusion_attention` (and its gradient kernel) in pure torch, for the tests only.

Not torch_npu, and nothing here runs on an NPU. It computes the documented math,
Softmax(Mask(scale * Q K^T)) V, in fp32 with autograd, and checks the documented call contract
strictly, so that the NPU glue (mindspeed_patches.features.flash_attention) fails here in the
same places it would fail (or silently compute something else) on an NPU:

* `input_layout` one of BSH, SBH, BSND, BNSD, TND; shapes per layout; `head_num` consistent with
  them (BSH / SBH: H = head_num * D; the N* layouts: head_num == N of the query); GQA when the
  query heads are an integer multiple of the key/value heads;
* everything after `input_layout` is keyword-only (as in torch_npu's own declaration);
* `scale` defaults to 1.0: a caller that forgets 1/sqrt(d) gets different numbers, as on an NPU;
* `atten_mask` is bool / uint8 with True = masked OUT; shapes BNSS, B1SS, 11SS or SS (TND: SS
  only). sparse_mode 0 takes an optional full mask plus the pre/next token band, 1 a full mask,
  2 (causal, top-left) and 3 (causal, bottom-right) the compressed 2048 x 2048
  `triu(ones, diagonal=1)` mask whatever the sequence lengths (checked element by element, so a
  mask of the wrong polarity fails); the other modes are not emulated and raise;
* TND: `actual_seq_qlen` / `actual_seq_kvlen` are host lists of ints (not tensors) holding the
  CUMULATIVE END offset of each sequence, without a leading 0, strictly increasing, the last one
  equal to the number of tokens; no query row may be left with every key masked;
* pse, padding_mask and prefix are not used by this project and raise when given.

Returns (out, softmax_max, softmax_sum, softmax_in, seed, offset, numels): `out` in the query's
layout and dtype (differentiable); softmax_max / softmax_sum fp32, [B, N, Sq, 8] (TND: [T, N, 8]),
the row max m of the masked, scaled scores and the row sum l of exp(scores - m), replicated over
the trailing 8 (what ring attention merges: lse = m + log l). A row with every key masked (not
allowed in TND) gets out 0, m = -inf, l = 0. keep_prob < 1 applies torch dropout to the
probabilities (not the NPU's random stream); softmax_in is an empty tensor, seed / offset /
numels are 0.

`npu_fusion_attention_grad` (what ring attention's backward calls per block) takes the same
contract plus the forward's statistics and output; see its docstring.

`CALLS` counts the calls by (input_layout, sparse_mode), and the gradient kernel's by ("grad",
input_layout, sparse_mode), so tests can prove the NPU path ran.
"""
from __future__ import annotations

import collections
import functools
import weakref
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
COMPRESSED_MASK_SIZE = 2048
_NO_BAND = 2147483647
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 768

CALLS: "collections.Counter[Tuple[str, int]]" = collections.Counter()


def _fail(message: str):
    raise ValueError(f"npu_fusion_attention (emulation): {message}")


def compressed_causal_mask(device=None) -> torch.Tensor:
    """The mask sparse modes 2 and 3 take: triu(ones(2048, 2048), diagonal=1), bool, True = masked."""
    n = COMPRESSED_MASK_SIZE
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(diagonal=1)


# compressed masks already checked element by element (callers pass one cached tensor per device)
_VERIFIED: dict = {}


@functools.lru_cache(maxsize=1)
def _reference_compressed() -> torch.Tensor:
    return compressed_causal_mask()


def _check_compressed(mask: Optional[torch.Tensor], sparse_mode: int) -> None:
    n = COMPRESSED_MASK_SIZE
    if mask is None:
        _fail(f"sparse_mode {sparse_mode} needs atten_mask = the compressed {n}x{n} triu(ones, diagonal=1) mask")
    if tuple(mask.shape) != (n, n):
        _fail(f"sparse_mode {sparse_mode} takes the compressed {n}x{n} atten_mask whatever the sequence "
              f"lengths, got shape {tuple(mask.shape)}")
    seen = _VERIFIED.get(id(mask))
    if seen is not None and seen[0]() is mask and seen[1] == mask._version:
        return  # this very tensor, unmodified since, passed the element-wise check
    if not torch.equal(mask.bool().cpu(), _reference_compressed()):
        _fail(f"sparse_mode {sparse_mode}: atten_mask is not triu(ones({n}, {n}), diagonal=1) "
              "(True = masked out: the upper triangle above the diagonal)")
    _VERIFIED[id(mask)] = (weakref.ref(mask), mask._version)


def _heads(layout: str, q: torch.Tensor, k: torch.Tensor, head_num: int) -> Tuple[int, int, int]:
    """(query heads, key/value heads, head dim) from the shapes, checked against head_num."""
    if layout in ("BSH", "SBH"):
        if q.shape[-1] % head_num:
            _fail(f"{layout}: hidden size {q.shape[-1]} of the query is not a multiple of head_num {head_num}")
        d = q.shape[-1] // head_num
        if k.shape[-1] % d:
            _fail(f"{layout}: key hidden size {k.shape[-1]} is not a multiple of the head dim {d} "
                  f"(= query hidden {q.shape[-1]} / head_num {head_num})")
        return head_num, k.shape[-1] // d, d
    n_axis = 2 if layout == "BSND" else 1  # BNSD [B, N, S, D], TND [T, N, D]
    nq, nkv, d = q.shape[n_axis], k.shape[n_axis], q.shape[-1]
    if nq != head_num:
        _fail(f"{layout}: head_num {head_num} but the query has {nq} heads")
    if k.shape[-1] != d:
        _fail(f"{layout}: head dim {d} of the query, {k.shape[-1]} of the key")
    return nq, nkv, d


def _to_bnsd(x: torch.Tensor, layout: str, n: int) -> torch.Tensor:
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BSH":
        return x.unflatten(-1, (n, -1)).transpose(1, 2)
    if layout == "SBH":
        return x.unflatten(-1, (n, -1)).permute(1, 2, 0, 3)
    raise AssertionError(layout)


def _from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BSH":
        return x.transpose(1, 2).flatten(-2)
    if layout == "SBH":
        return x.permute(2, 0, 1, 3).flatten(-2)
    raise AssertionError(layout)


def _check_cumulative(name: str, ends, total: int) -> List[int]:
    if ends is None:
        _fail(f"TND needs {name} (cumulative end offsets of the sequences, without a leading 0)")
    if isinstance(ends, torch.Tensor) or not isinstance(ends, (list, tuple)):
        _fail(f"{name} must be a host list of ints, got {type(ends).__name__}")
    if not ends or not all(isinstance(e, int) and not isinstance(e, bool) for e in ends):
        _fail(f"{name} must be a non-empty list of ints, got {ends!r}")
    if ends[0] == 0:
        _fail(f"{name} starts with 0: it holds the cumulative END offsets without a leading 0 "
              f"(lengths 2,2,2 -> [2, 4, 6]); got {list(ends)}")
    if ends[0] < 0 or any(b <= a for a, b in zip(ends, ends[1:])):
        _fail(f"{name} must be strictly increasing positive cumulative ends, got {list(ends)}")
    if ends[-1] != total:
        _fail(f"{name} ends at {ends[-1]} but the tensor holds {total} tokens")
    return list(ends)


def _full_mask_shape_ok(mask: torch.Tensor, b: int, n: int, sq: int, sk: int, tnd: bool) -> bool:
    shape = tuple(mask.shape)
    if tnd:
        return shape == (sq, sk)
    return shape in ((b, n, sq, sk), (b, 1, sq, sk), (1, 1, sq, sk), (sq, sk))


def _visible(sq: int, sk: int, sparse_mode: int, pre: int, nxt: int, device) -> Optional[torch.Tensor]:
    """[sq, sk] bool, True = masked out, from the sparse mode (None: nothing masked)."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    if sparse_mode == 2:
        return j > i
    if sparse_mode == 3:
        return j > i + (sk - sq)
    if sparse_mode == 0 and (pre < _NO_BAND or nxt < _NO_BAND):
        return (j > i + nxt) | (j < i - pre)
    return None


def _attention(q, k, v, masked, scale: float, keep_prob: float, tnd: bool):
    """q [B, N, Sq, D], k/v [B, Nkv, Sk, D], masked broadcastable to [B, N, Sq, Sk] (True = out)."""
    groups = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(groups, dim=1)
    vf = v.float().repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
    m = scores.detach().amax(dim=-1, keepdim=True)
    empty = m == float("-inf")
    if tnd and bool(empty.any()):
        _fail("TND: a query row has every key masked (not allowed in TND); check actual_seq_kvlen "
              "and the sparse mode")
    m_safe = m.masked_fill(empty, 0.0)
    p = torch.exp(scores - m_safe)
    l = p.sum(dim=-1, keepdim=True)
    probs = p / torch.where(l > 0, l, torch.ones_like(l))  # l keeps its gradient: softmax's normaliser
    if keep_prob < 1.0:
        probs = F.dropout(probs, p=1.0 - keep_prob)
    out = torch.matmul(probs, vf).to(q.dtype)
    return out, m.squeeze(-1), l.detach().squeeze(-1)


def _check_call(query, key, value, head_num, input_layout, pse, padding_mask, prefix, scale, keep_prob,
                sparse_mode, atten_mask, op: str = "npu_fusion_attention") -> Tuple[bool, int, int, int]:
    """The argument contract both ops share; returns (tnd, query heads, key/value heads, head dim)."""
    if input_layout not in LAYOUTS:
        _fail(f"input_layout {input_layout!r} is not one of {', '.join(LAYOUTS)}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a tensor")
        if t.dtype not in _DTYPES:
            _fail(f"{name} dtype {t.dtype}; float16, bfloat16 or float32")
        if t.dim() != len(input_layout):
            _fail(f"{input_layout} takes {len(input_layout)}-D tensors, {name} is {tuple(t.shape)}")
    if not query.dtype == key.dtype == value.dtype:
        _fail(f"query, key, value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}")
    if key.shape != value.shape:
        _fail(f"key {tuple(key.shape)} and value {tuple(value.shape)} shapes differ")
    if pse is not None or padding_mask is not None or prefix is not None:
        raise NotImplementedError(f"{op} (emulation): pse, padding_mask and prefix are not emulated")
    if sparse_mode not in (0, 1, 2, 3):
        raise NotImplementedError(f"{op} (emulation): sparse_mode {sparse_mode} is not emulated "
                                  "(0, 1, 2, 3 are)")
    if not 0.0 < keep_prob <= 1.0:
        _fail(f"keep_prob {keep_prob} outside (0, 1]")
    if not isinstance(head_num, int) or head_num < 1:
        _fail(f"head_num must be a positive int, got {head_num!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        _fail(f"scale must be a float, got {type(scale).__name__}")
    if atten_mask is not None and atten_mask.dtype not in (torch.bool, torch.uint8):
        _fail(f"atten_mask dtype {atten_mask.dtype}; bool or uint8 (True / 1 = masked out)")

    tnd = input_layout == "TND"
    nq, nkv, d = _heads(input_layout, query, key, head_num)
    if nkv < 1 or nq % nkv:
        _fail(f"{nq} query heads are not an integer multiple of {nkv} key/value heads (GQA)")
    if d > MAX_HEAD_DIM:
        _fail(f"head dim {d} > {MAX_HEAD_DIM}")
    if sparse_mode in (2, 3):
        _check_compressed(atten_mask, sparse_mode)
    elif sparse_mode == 1 and atten_mask is None:
        _fail("sparse_mode 1 (all mask) needs the full atten_mask")
    return tnd, nq, nkv, d


def npu_fusion_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, head_num: int,
                         input_layout: str, *, pse=None, padding_mask=None, atten_mask=None, scale: float = 1.0,
                         keep_prob: float = 1.0, pre_tockens: int = _NO_BAND, next_tockens: int = _NO_BAND,
                         inner_precise: int = 0, prefix=None, actual_seq_qlen: Optional[Sequence[int]] = None,
                         actual_seq_kvlen: Optional[Sequence[int]] = None, sparse_mode: int = 0,
                         gen_mask_parallel: bool = True, sync: bool = False):
    """EMULATION of torch_npu.npu_fusion_attention (see the module docstring for the contract)."""
    tnd, nq, nkv, d = _check_call(query, key, value, head_num, input_layout, pse, padding_mask, prefix, scale,
                                  keep_prob, sparse_mode, atten_mask)
    CALLS[(input_layout, sparse_mode)] += 1

    if tnd:
        if query.shape[0] == 0:
            _fail("TND: no tokens")
        q_ends = _check_cumulative("actual_seq_qlen", actual_seq_qlen, query.shape[0])
        k_ends = _check_cumulative("actual_seq_kvlen", actual_seq_kvlen, key.shape[0])
        if len(q_ends) != len(k_ends):
            _fail(f"actual_seq_qlen has {len(q_ends)} sequences, actual_seq_kvlen {len(k_ends)}")
        q_bounds, k_bounds = [0] + q_ends, [0] + k_ends
        max_q = max(b - a for a, b in zip(q_bounds, q_bounds[1:]))
        max_k = max(b - a for a, b in zip(k_bounds, k_bounds[1:]))
        if sparse_mode in (0, 1) and atten_mask is not None and not _full_mask_shape_ok(
                atten_mask, 1, nq, max_q, max_k, tnd=True):
            _fail(f"TND takes an SS atten_mask ({max_q}, {max_k}), got {tuple(atten_mask.shape)}")
        outs, maxes, sums = [], [], []
        for i in range(len(q_ends)):
            q = query[q_bounds[i]:q_bounds[i + 1]].transpose(0, 1).unsqueeze(0)
            k = key[k_bounds[i]:k_bounds[i + 1]].transpose(0, 1).unsqueeze(0)
            v = value[k_bounds[i]:k_bounds[i + 1]].transpose(0, 1).unsqueeze(0)
            sq, sk = q.shape[2], k.shape[2]
            masked = _visible(sq, sk, sparse_mode, pre_tockens, next_tockens, query.device)
            if sparse_mode in (0, 1) and atten_mask is not None:
                full = atten_mask[:sq, :sk].bool()
                masked = full if masked is None else masked | full
            out, m, l = _attention(q, k, v, masked, float(scale), keep_prob, tnd=True)
            outs.append(out[0].transpose(0, 1))
            maxes.append(m[0].transpose(0, 1))
            sums.append(l[0].transpose(0, 1))
        out = torch.cat(outs)
        softmax_max, softmax_sum = torch.cat(maxes), torch.cat(sums)  # [T, N]
    else:
        if actual_seq_qlen is not None or actual_seq_kvlen is not None:
            _fail(f"actual_seq_qlen / actual_seq_kvlen belong to the TND layout, not {input_layout}")
        q, k, v = (_to_bnsd(t, input_layout, n) for t, n in ((query, nq), (key, nkv), (value, nkv)))
        if q.shape[0] != k.shape[0]:
            _fail(f"batch {q.shape[0]} of the query, {k.shape[0]} of the key")
        b, sq, sk = q.shape[0], q.shape[2], k.shape[2]
        masked = _visible(sq, sk, sparse_mode, pre_tockens, next_tockens, query.device)
        if sparse_mode in (0, 1) and atten_mask is not None:
            if not _full_mask_shape_ok(atten_mask, b, nq, sq, sk, tnd=False):
                _fail(f"atten_mask shape {tuple(atten_mask.shape)}: BNSS {(b, nq, sq, sk)}, B1SS, 11SS or SS "
                      f"{(sq, sk)}")
            full = atten_mask.bool()
            masked = full if masked is None else masked | full
        out, softmax_max, softmax_sum = _attention(q, k, v, masked, float(scale), keep_prob, tnd=False)
        out = _from_bnsd(out, input_layout)  # softmax_*: [B, N, Sq]
    # the kernel replicates each row's statistic over a trailing dimension of 8
    softmax_max = softmax_max.unsqueeze(-1).expand(*softmax_max.shape, 8).contiguous()
    softmax_sum = softmax_sum.unsqueeze(-1).expand(*softmax_sum.shape, 8).contiguous()
    softmax_in = torch.empty(0, dtype=query.dtype, device=query.device)
    return out.contiguous(), softmax_max, softmax_sum, softmax_in, 0, 0, 0


def _check_statistic(name: str, t, rows_shape: Tuple[int, ...]) -> torch.Tensor:
    """softmax_max / softmax_sum of the forward: fp32 [B, N, Sq, 8], one value replicated over the 8."""
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} is required (the forward's [B, N, Sq, 8] fp32 statistic), got {t!r}")
    if t.dtype != torch.float32:
        _fail(f"{name} dtype {t.dtype}; float32")
    if tuple(t.shape) != (*rows_shape, 8):
        _fail(f"{name} shape {tuple(t.shape)}, the query rows need {(*rows_shape, 8)}")
    if not torch.equal(t, t[..., :1].expand_as(t)):
        _fail(f"{name}: the trailing 8 must replicate one value per row")
    return t[..., 0]


def npu_fusion_attention_grad(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dy: torch.Tensor,
                              head_num: int, input_layout: str, *, pse=None, padding_mask=None, atten_mask=None,
                              softmax_max=None, softmax_sum=None, softmax_in=None, attention_in=None,
                              scale_value: float = 1.0, keep_prob: float = 1.0, pre_tockens: int = _NO_BAND,
                              next_tockens: int = _NO_BAND, inner_precise: int = 0, seed: int = 0, offset: int = 0,
                              numels: int = 0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                              sparse_mode: int = 0, gen_mask_parallel: bool = True, sync: bool = False):
    """EMULATION of torch_npu.npu_fusion_attention_grad: (dq, dk, dv, dpse) of one attention call.

    Contract as the forward's (layout, shapes, head_num, GQA, masks per sparse mode; `scale_value`
    here, not `scale`), plus: `dy` and `attention_in` (the forward's output) shaped and typed like
    the query; `softmax_max` / `softmax_sum` the fp32 [B, N, Sq, 8] statistics. Like the kernel, it
    recomputes the probabilities from THOSE statistics, P = exp(scale * Q K^T - max) / sum, and takes
    delta = rowsum(dy * attention_in), so statistics or outputs of other rows give other gradients.
    dq / dk / dv come back in the inputs' layout and dtype, dpse empty. Dropout (keep_prob < 1)
    and TND are not emulated (the project's ring backward calls BNSD).
    """
    tnd, nq, nkv, d = _check_call(query, key, value, head_num, input_layout, pse, padding_mask, prefix,
                                  scale_value, keep_prob, sparse_mode, atten_mask, op="npu_fusion_attention_grad")
    if tnd or keep_prob < 1.0:
        raise NotImplementedError("npu_fusion_attention_grad (emulation): TND and dropout are not emulated")
    if actual_seq_qlen is not None or actual_seq_kvlen is not None:
        _fail(f"actual_seq_qlen / actual_seq_kvlen belong to the TND layout, not {input_layout}")
    for name, t in (("dy", dy), ("attention_in", attention_in)):
        if not isinstance(t, torch.Tensor) or t.shape != query.shape or t.dtype != query.dtype:
            _fail(f"{name} must be shaped and typed like the query {tuple(query.shape)} {query.dtype}, got "
                  f"{tuple(t.shape) + (t.dtype,) if isinstance(t, torch.Tensor) else t!r}")
    CALLS[("grad", input_layout, sparse_mode)] += 1
    q, k, v, g, o = (_to_bnsd(t, input_layout, n) for t, n in
                     ((query, nq), (key, nkv), (value, nkv), (dy, nq), (attention_in, nq)))
    b, sq, sk = q.shape[0], q.shape[2], k.shape[2]
    m = _check_statistic("softmax_max", softmax_max, (b, nq, sq))
    l = _check_statistic("softmax_sum", softmax_sum, (b, nq, sq))
    masked = _visible(sq, sk, sparse_mode, pre_tockens, next_tockens, query.device)
    if sparse_mode in (0, 1) and atten_mask is not None:
        if not _full_mask_shape_ok(atten_mask, b, nq, sq, sk, tnd=False):
            _fail(f"atten_mask shape {tuple(atten_mask.shape)}: BNSS {(b, nq, sq, sk)}, B1SS, 11SS or SS {(sq, sk)}")
        full = atten_mask.bool()
        masked = full if masked is None else masked | full
    groups = nq // nkv
    qf, gf, of = q.float(), g.float(), o.float()
    kf, vf = k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * float(scale_value)
    if masked is not None:
        s = s.masked_fill(masked, float("-inf"))
    p = torch.exp(s - m.unsqueeze(-1)) / l.unsqueeze(-1)
    p = torch.nan_to_num(p, nan=0.0)  # masked scores of rows whose statistic is +-inf
    delta = (gf * of).sum(-1, keepdim=True)
    ds = p * (torch.matmul(gf, vf.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, kf) * float(scale_value)
    dk = (torch.matmul(ds.transpose(-1, -2), qf) * float(scale_value)).view(b, nkv, groups, sk, d).sum(2)
    dv = torch.matmul(p.transpose(-1, -2), gf).view(b, nkv, groups, sk, d).sum(2)
    dpse = torch.empty(0, dtype=query.dtype, device=query.device)
    return (_from_bnsd(dq, input_layout).to(query.dtype).contiguous(),
            _from_bnsd(dk, input_layout).to(key.dtype).contiguous(),
            _from_bnsd(dv, input_layout).to(value.dtype).contiguous(), dpse)


__all__ = ["npu_fusion_attention", "npu_fusion_attention_grad", "compressed_causal_mask", "CALLS", "LAYOUTS", "COMPRESSED_MASK_SIZE"]
