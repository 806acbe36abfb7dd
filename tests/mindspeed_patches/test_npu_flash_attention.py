"""The npu_fusion_attention EMULATION against plain torch attention, its contract checks, and the glue.

The emulation (tests/emulation/torch_npu/fusion_attention.py) must equal an independent torch
reference (scaled_dot_product_attention with explicitly built masks) in every layout and sparse
mode the NPU path uses, GQA, odd lengths and 1-token documents included, for the output, the
softmax statistics and the gradients. Each contract violation that NPU glue typically commits
(a leading 0 in actual_seq_qlen, a full mask where sparse_mode 2 takes the compressed 2048 one,
the mask's polarity, a forgotten scale, a bad layout, ...) must fail or visibly change the result,
so that the model-level tests (test_npu_model_equivalence.py) catch bad glue. The gradient
kernel's emulation (npu_fusion_attention_grad) must give autograd's gradients of the same reference
from the statistics it is fed. The ring's NPU block kernels (features/npu_attention.npu_block_forward_
and npu_block_backward_) are checked against the torch block kernels they replace.
"""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

EMULATION = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "emulation")
# The emulation as `torch_npu` and its fusion_attention module, set by the fixture below: only while
# this module's tests run, so no other test (e.g. backend auto-detection) sees a torch_npu.
torch_npu = emu = None


@pytest.fixture(scope="module", autouse=True)
def _torch_npu_emulation():
    global torch_npu, emu
    sys.path.insert(0, EMULATION)
    import torch_npu as module
    from torch_npu import fusion_attention

    assert module.IS_EMULATION is True
    torch_npu, emu = module, fusion_attention
    yield
    sys.path.remove(EMULATION)
    for name in [m for m in sys.modules if m == "torch_npu" or m.startswith("torch_npu.")]:
        del sys.modules[name]
    torch_npu = emu = None

TOL = 1e-5
D = 8


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _reference(q, k, v, scale, masked=None):
    """q [B, N, Sq, D], k/v [B, Nkv, Sk, D]; masked [.., Sq, Sk] True = out. (out, row max, row sum)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if masked is None else ~masked, scale=scale)
    s = (q @ k.transpose(-1, -2)) * scale
    if masked is not None:
        s = s.masked_fill(masked, float("-inf"))
    m = s.amax(-1)
    return out, m.detach(), torch.exp(s - m.unsqueeze(-1)).sum(-1).detach()


def _qkv(b, hq, hkv, sq, sk, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, D, generator=g, dtype=torch.float64).float()
    k = torch.randn(b, hkv, sk, D, generator=g, dtype=torch.float64).float()
    v = torch.randn(b, hkv, sk, D, generator=g, dtype=torch.float64).float()
    return [t.requires_grad_() for t in (q, k, v)]


def _to_layout(x, layout):
    return {"BNSD": x, "BSND": x.transpose(1, 2), "BSH": x.transpose(1, 2).flatten(-2),
            "SBH": x.permute(2, 0, 1, 3).flatten(-2)}[layout]


def _from_layout(x, layout, n):
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BSH":
        return x.unflatten(-1, (n, D)).transpose(1, 2)
    return x.unflatten(-1, (n, D)).permute(1, 2, 0, 3)


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.autograd.grad(out, inputs, torch.randn(out.shape, generator=g))


def _compare(got, ref, what):
    err = _rel(got, ref)
    assert err <= TOL, f"{what}: relative error {err:.2e}"


CASES = {
    # name -> (sq, sk, sparse_mode, the atten_mask passed: None, the compressed one or a random full one)
    "bidirectional": (7, 7, 0, None),
    "causal_mode2": (7, 7, 2, "compressed"),
    "decode_mode3": (3, 11, 3, "compressed"),
    "top_left_mode2_fewer_queries": (3, 11, 2, "compressed"),
    "full_mask_SS": (5, 9, 0, "SS"),
    "full_mask_B1SS": (5, 9, 0, "B1SS"),
    "full_mask_BNSS_mode1": (5, 9, 1, "BNSS"),
}


def _mask_for(kind, b, n, sq, sk):
    if kind is None:
        return None, None
    if kind == "compressed":
        return emu.compressed_causal_mask(), None  # the reference mask is built per mode below
    g = torch.Generator().manual_seed(5)
    shape = {"SS": (sq, sk), "B1SS": (b, 1, sq, sk), "BNSS": (b, n, sq, sk)}[kind]
    masked = torch.rand(shape, generator=g) < 0.4
    masked[..., 0] = False  # every row keeps a key
    return masked.to(torch.uint8) if kind == "B1SS" else masked, masked


@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND", "BNSD"])
@pytest.mark.parametrize("case", list(CASES))
def test_emulation_equals_torch_attention(layout, case):
    sq, sk, mode, kind = CASES[case]
    b, hq, hkv = 2, 4, 2  # GQA: two query heads per KV head
    q, k, v = _qkv(b, hq, hkv, sq, sk)
    scale = 1 / math.sqrt(D)
    atten_mask, masked = _mask_for(kind, b, hq, sq, sk)
    i, j = torch.arange(sq).unsqueeze(1), torch.arange(sk).unsqueeze(0)
    if mode == 2:
        masked = j > i
    elif mode == 3:
        masked = j > i + (sk - sq)
    before = emu.CALLS[(layout, mode)]
    out, smax, ssum, *_ = torch_npu.npu_fusion_attention(
        _to_layout(q, layout), _to_layout(k, layout), _to_layout(v, layout), hq, layout, atten_mask=atten_mask,
        scale=scale, sparse_mode=mode)
    assert emu.CALLS[(layout, mode)] == before + 1
    ref, m, l = _reference(q, k, v, scale, masked)
    assert out.shape == _to_layout(ref, layout).shape and out.dtype == q.dtype
    _compare(_from_layout(out, layout, hq), ref, "out")
    assert smax.shape == (b, hq, sq, 8) and ssum.shape == (b, hq, sq, 8)
    assert smax.dtype == ssum.dtype == torch.float32
    assert torch.equal(smax, smax[..., :1].expand_as(smax)) and torch.equal(ssum, ssum[..., :1].expand_as(ssum))
    _compare(smax[..., 0], m, "softmax_max")
    _compare(ssum[..., 0], l, "softmax_sum")
    for got, want, name in zip(_grads(out, (q, k, v)), _grads(_to_layout(ref, layout), (q, k, v)), "qkv"):
        _compare(got, want, f"d{name}")


@pytest.mark.parametrize("layout", ["SBH", "BNSD"])
@pytest.mark.parametrize("case", list(CASES))
def test_grad_emulation_equals_torch_autograd(layout, case):
    """npu_fusion_attention_grad fed the forward's own statistics and output gives autograd's
    gradients of the reference attention; fed (max = lse, sum = 1), what the ring passes, the same."""
    sq, sk, mode, kind = CASES[case]
    b, hq, hkv = 2, 4, 2
    q, k, v = _qkv(b, hq, hkv, sq, sk)
    scale = 1 / math.sqrt(D)
    atten_mask, masked = _mask_for(kind, b, hq, sq, sk)
    i, j = torch.arange(sq).unsqueeze(1), torch.arange(sk).unsqueeze(0)
    masked = {2: j > i, 3: j > i + (sk - sq)}.get(mode, masked)
    ref = _reference(q, k, v, scale, masked)[0]
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    want = torch.autograd.grad(ref, (q, k, v), dy)
    lay = [_to_layout(t.detach(), layout) for t in (q, k, v, dy)]
    out, smax, ssum = torch_npu.npu_fusion_attention(*lay[:3], hq, layout, atten_mask=atten_mask, scale=scale,
                                                     sparse_mode=mode)[:3]
    lse = smax + torch.log(ssum)
    for stats in ((smax, ssum), (lse, torch.ones_like(lse))):
        before = emu.CALLS[("grad", layout, mode)]
        got = torch_npu.npu_fusion_attention_grad(*lay, hq, layout, atten_mask=atten_mask, softmax_max=stats[0],
                                                  softmax_sum=stats[1], attention_in=out.detach(), scale_value=scale,
                                                  sparse_mode=mode)
        assert emu.CALLS[("grad", layout, mode)] == before + 1 and got[3].numel() == 0
        for g, w, t, name in zip(got[:3], want, lay, "qkv"):
            assert g.shape == t.shape and g.dtype == t.dtype
            _compare(_from_layout(g, layout, hq if name == "q" else hkv), w, f"d{name}")


def _call_grad(**over):
    q, k, v, dy = (torch.randn(1, 4 if n == "q" or n == "dy" else 2, 6, D) for n in ("q", "k", "v", "dy"))
    stat = torch.zeros(1, 4, 6, 8)
    kw = dict(softmax_max=stat, softmax_sum=stat + 1, attention_in=torch.randn(1, 4, 6, D), scale_value=0.3,
              sparse_mode=2, atten_mask=emu.compressed_causal_mask())
    kw.update(over)
    return torch_npu.npu_fusion_attention_grad(q, k, v, dy, 4, "BNSD", **kw)


GRAD_VIOLATIONS = {
    "no softmax_max": (dict(softmax_max=None), "softmax_max is required"),
    "statistic without the trailing 8": (dict(softmax_sum=torch.ones(1, 4, 6)), "softmax_sum shape"),
    "statistic of other rows": (dict(softmax_max=torch.zeros(1, 4, 5, 8)), "softmax_max shape"),
    "trailing 8 not replicated": (dict(softmax_max=torch.arange(8.0).expand(1, 4, 6, 8)), "replicate"),
    "bf16 statistic": (dict(softmax_sum=torch.ones(1, 4, 6, 8, dtype=torch.bfloat16)), "float32"),
    "no attention_in": (dict(attention_in=None), "attention_in must be shaped"),
    "attention_in of another dtype": (dict(attention_in=torch.randn(1, 4, 6, D).bfloat16()),
                                      "attention_in must be shaped"),
    "mode 2 with an SxS mask": (dict(atten_mask=torch.ones(6, 6, dtype=torch.bool).triu(1)), "compressed 2048x2048"),
}


@pytest.mark.parametrize("name", list(GRAD_VIOLATIONS))
def test_grad_contract_violation_fails(name):
    over, message = GRAD_VIOLATIONS[name]
    with pytest.raises(ValueError, match=message):
        _call_grad(**over)


def test_grad_takes_scale_value_not_the_forwards_scale():
    with pytest.raises(TypeError):
        _call_grad(scale=0.3)


def _packed(lengths_q, lengths_k, hq=4, hkv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), hq, D, generator=g).requires_grad_()
    k = torch.randn(sum(lengths_k), hkv, D, generator=g).requires_grad_()
    v = torch.randn(sum(lengths_k), hkv, D, generator=g).requires_grad_()
    return q, k, v


def _ends(lengths):
    out, at = [], 0
    for n in lengths:
        at += n
        out.append(at)
    return out


def _packed_reference(q, k, v, lengths_q, lengths_k, scale, mode):
    outs, maxes, sums, a, c = [], [], [], 0, 0
    for nq, nk in zip(lengths_q, lengths_k):
        qi, ki, vi = (t.transpose(0, 1).unsqueeze(0) for t in (q[a:a + nq], k[c:c + nk], v[c:c + nk]))
        i, j = torch.arange(nq).unsqueeze(1), torch.arange(nk).unsqueeze(0)
        masked = {0: None, 2: j > i, 3: j > i + (nk - nq)}[mode]
        o, m, l = _reference(qi, ki, vi, scale, masked)
        outs.append(o[0].transpose(0, 1))
        maxes.append(m[0].transpose(0, 1))
        sums.append(l[0].transpose(0, 1))
        a, c = a + nq, c + nk
    return torch.cat(outs), torch.cat(maxes), torch.cat(sums)


@pytest.mark.parametrize("lengths_q,lengths_k,mode", [
    ((1, 5, 3, 1), (1, 5, 3, 1), 3),  # packed causal training, 1-token documents at both ends
    ((1, 5, 3, 1), (1, 5, 3, 1), 2),
    ((1, 5, 3, 1), (1, 5, 3, 1), 0),  # packed ViT-style bidirectional
    ((1, 2, 1), (4, 5, 1), 3),  # packed KV-cache decoding: the last queries of each document
])
def test_tnd_emulation_equals_per_document_attention(lengths_q, lengths_k, mode):
    q, k, v = _packed(lengths_q, lengths_k)
    scale = 1 / math.sqrt(D)
    kw = dict(atten_mask=emu.compressed_causal_mask()) if mode in (2, 3) else {}
    out, smax, ssum, *_ = torch_npu.npu_fusion_attention(
        q, k, v, 4, "TND", scale=scale, sparse_mode=mode, actual_seq_qlen=_ends(lengths_q),
        actual_seq_kvlen=_ends(lengths_k), **kw)
    ref, m, l = _packed_reference(q, k, v, lengths_q, lengths_k, scale, mode)
    assert smax.shape == ssum.shape == (q.shape[0], 4, 8)
    _compare(out, ref, "out")
    _compare(smax[..., 0], m, "softmax_max")
    _compare(ssum[..., 0], l, "softmax_sum")
    for got, want, name in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v)), "qkv"):
        _compare(got, want, f"d{name}")


def _call_tnd(**over):
    q, k, v = _packed((2, 3), (2, 3))
    kw = dict(scale=0.3, sparse_mode=3, atten_mask=emu.compressed_causal_mask(), actual_seq_qlen=[2, 5],
              actual_seq_kvlen=[2, 5])
    kw.update(over)
    return torch_npu.npu_fusion_attention(q, k, v, 4, "TND", **kw)


def _call_sbh(layout="SBH", head_num=4, **over):
    q, k, v = (_to_layout(t, "SBH").detach() for t in _qkv(1, 4, 2, 6, 6))
    kw = dict(scale=0.3, sparse_mode=2, atten_mask=emu.compressed_causal_mask())
    kw.update(over)
    return torch_npu.npu_fusion_attention(q, k, v, head_num, layout, **kw)


VIOLATIONS = {
    "leading 0 in actual_seq_qlen": (lambda: _call_tnd(actual_seq_qlen=[0, 2, 5]), "leading 0"),
    "leading 0 in actual_seq_kvlen": (lambda: _call_tnd(actual_seq_kvlen=[0, 2, 5]), "leading 0"),
    "lengths instead of cumulative ends": (lambda: _call_tnd(actual_seq_qlen=[2, 3]), "ends at 3"),
    "non-increasing ends": (lambda: _call_tnd(actual_seq_qlen=[3, 3, 5]), "strictly increasing"),
    "cu_seqlens tensor": (lambda: _call_tnd(actual_seq_qlen=torch.tensor([2, 5])), "host list"),
    "TND without lengths": (lambda: _call_tnd(actual_seq_qlen=None), "needs actual_seq_qlen"),
    "TND fully masked row": (lambda: _call_tnd(actual_seq_kvlen=[1, 5]), "every key masked"),
    "TND with a 4-D mask": (lambda: _call_tnd(sparse_mode=0, atten_mask=torch.zeros(1, 1, 3, 3, dtype=torch.bool)),
                            "SS atten_mask"),
    "mode 2 with an SxS mask": (lambda: _call_sbh(atten_mask=torch.ones(6, 6, dtype=torch.bool).triu(1)),
                                "compressed 2048x2048"),
    "mode 2 with the inverted mask": (lambda: _call_sbh(atten_mask=~emu.compressed_causal_mask()),
                                      "not triu"),
    "mode 3 without a mask": (lambda: _call_sbh(sparse_mode=3, atten_mask=None), "needs atten_mask"),
    "float mask": (lambda: _call_sbh(sparse_mode=0, atten_mask=torch.zeros(6, 6)), "bool or uint8"),
    "wrong full mask shape": (lambda: _call_sbh(sparse_mode=0, atten_mask=torch.zeros(6, 5, dtype=torch.bool)),
                              "atten_mask shape"),
    "bad layout": (lambda: _call_sbh(layout="BHSD"), "input_layout"),
    "lower-case layout": (lambda: _call_sbh(layout="sbh"), "input_layout"),
    "head_num not dividing H": (lambda: _call_sbh(head_num=5), "not a multiple of head_num"),
    "key hidden not a multiple of the head dim": (
        lambda: torch_npu.npu_fusion_attention(torch.randn(6, 1, 24), torch.randn(6, 1, 16), torch.randn(6, 1, 16), 4,
                                               "SBH", scale=0.3), "not a multiple of the head dim"),
    "lengths outside TND": (lambda: _call_sbh(actual_seq_qlen=[6]), "belong to the TND layout"),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_contract_violation_fails(name):
    call, message = VIOLATIONS[name]
    with pytest.raises(ValueError, match=message):
        call()


def test_arguments_after_layout_are_keyword_only():
    q = torch.randn(1, 4, 3, D)
    with pytest.raises(TypeError):
        torch_npu.npu_fusion_attention(q, q, q, 4, "BNSD", None, None, None, 1 / math.sqrt(D))


def test_gqa_needs_integer_group():
    q, k, v = torch.randn(1, 6, 3, D), torch.randn(1, 4, 3, D), torch.randn(1, 4, 3, D)
    with pytest.raises(ValueError, match="integer multiple"):
        torch_npu.npu_fusion_attention(q, k, v, 6, "BNSD", scale=0.3)


def test_default_scale_is_one_so_a_missing_scale_changes_the_result():
    q, k, v = _qkv(1, 4, 2, 6, 6)
    ref_scaled = _reference(q, k, v, 1 / math.sqrt(D))[0]
    forgot = torch_npu.npu_fusion_attention(q, k, v, 4, "BNSD")[0]
    assert _rel(forgot, ref_scaled) > 1e-2
    _compare(forgot, _reference(q, k, v, 1.0)[0], "scale 1.0")


def test_tnd_lengths_drop_the_leading_zero_and_empty_documents():
    from mindspeed_patches.features.npu_attention import tnd_lengths

    cu = torch.tensor([0, 1, 1, 6, 9, 10], dtype=torch.int32)  # document 1 is empty
    assert tnd_lengths(cu, cu) == ([1, 6, 9, 10], [1, 6, 9, 10])
    with pytest.raises(ValueError, match="document 0"):
        tnd_lengths(torch.tensor([0, 0, 4]), torch.tensor([0, 2, 4]))


def test_npu_block_kernel_equals_torch_block_kernel():
    """The ring's forward step through the kernel (softmax_max / softmax_sum -> lse -> merge_) equals
    the torch block kernel: a causal diagonal block, then unmasked blocks merged into the same rows."""
    from megatron_vita.parallel.context.blocks import Segment, attention_forward_, new_accumulator
    from mindspeed_patches.features.npu_attention import npu_block_forward_

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 10, D, generator=g)
    k, v = torch.randn(2, 2, 10, D, generator=g), torch.randn(2, 2, 10, D, generator=g)
    pos = torch.tensor([0, 1, 2, 7, 8, 0, 1, 4, 5, 6])  # two documents, load-balanced chunk positions
    steps = [[Segment(0, 5, 0, 5, causal=True), Segment(5, 10, 5, 10, causal=True)],
             [Segment(0, 5, 0, 3), Segment(7, 10, 5, 10)],
             [Segment(3, 5, 0, 5)]]
    results = []
    for kernel in (attention_forward_, npu_block_forward_):
        out, lse = new_accumulator(q)
        for segments in steps:
            kernel(out, lse, q, k, v, segments, 0.35, pos, pos, 4)
        results.append((out, lse))
    calls = emu.CALLS[("BNSD", 2)]
    npu_block_forward_(*new_accumulator(q), q, k, v, steps[0], 0.35, pos, pos)
    assert emu.CALLS[("BNSD", 2)] == calls + 2
    _compare(results[1][0], results[0][0], "out")
    _compare(results[1][1], results[0][1], "lse")
    with pytest.raises(ValueError, match="not a diagonal block"):
        npu_block_forward_(*new_accumulator(q), q, k, v, [Segment(0, 5, 5, 10, causal=True)], 0.35, pos, pos)

    # Backward: the gradient kernel per segment, fed the final statistics (lse) and output, adds
    # the same dQ, dK, dV as the torch block backward; a row that saw no key (lse -inf) adds nothing.
    from megatron_vita.parallel.context.ring import torch_block_backward_
    from mindspeed_patches.features.npu_attention import npu_block_backward_

    out, lse = results[0]
    out, lse = out.clone(), lse.clone()
    lse[1, 3, 4], out[1, 3, 4] = float("-inf"), 0.0
    dout = torch.randn(q.shape, generator=g)
    delta = (dout * out).sum(-1)
    grads = []
    for kernel in (torch_block_backward_, npu_block_backward_):
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for segments in steps:
            kernel(dq, dk, dv, q, k, v, dout, out, lse, delta, segments, 0.35, pos, pos, 4)
        grads.append((dq, dk, dv))
    assert emu.CALLS[("grad", "BNSD", 2)] >= 2 and emu.CALLS[("grad", "BNSD", 0)] >= 3
    for got, ref, name in zip(grads[1], grads[0], ("dq", "dk", "dv")):
        _compare(got, ref, name)
    assert float(grads[1][0][1, 3, 4].abs().max()) == 0.0
