"""The CUDA leaf choice and the flash-attn leaf's glue, checked on the CPU against an EMULATION of
flash-attn 2's documented contract written here (`_FlashAttnEmulation`: pure torch, strict about
dtype, layout, GQA heads, contiguity, int32 cu_seqlens with the leading 0, int max_seqlen, and
bottom-right causal alignment). Neither flash-attn nor a GPU ran: these results say the glue
feeds flash-attn what its documentation asks for, nothing about CUDA kernels.
"""
import math
import types

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vita.config.parallel import ParallelConfig
from megatron_vita.models.common.attention import CoreAttention
from megatron_vita.models.common.leaves import leaves_for


def _attention_emulated(q, k, v, scale, causal):
    """q [sq, hq, d], k/v [sk, hkv, d] -> [sq, hq, d]: softmax in fp32, causal bottom-right,
    fully masked rows give 0 (flash-attn's documented behaviour)."""
    sq, hq, _ = q.shape
    sk, hkv, _ = k.shape
    rep = hq // hkv
    k, v = k.float().repeat_interleave(rep, dim=1), v.float().repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if causal:
        keep = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


class _FlashAttnEmulation(types.ModuleType):
    """EMULATION of flash_attn's two entry points (contract only; records its calls)."""

    def __init__(self):
        super().__init__("flash_attn")
        self.calls = []

    @staticmethod
    def _check(q, k, v, dropout_p, softmax_scale):
        for t in (q, k, v):
            assert t.dtype in (torch.float16, torch.bfloat16), f"flash-attn takes fp16/bf16, got {t.dtype}"
            assert t.stride(-1) == 1, "flash-attn needs the last dimension contiguous"
        assert q.dtype == k.dtype == v.dtype and q.shape[-1] == k.shape[-1] == v.shape[-1] <= 256
        assert k.shape == v.shape and q.shape[-2] % k.shape[-2] == 0, "query heads must be a multiple of KV heads"
        assert dropout_p == 0.0 and isinstance(softmax_scale, float)

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert q.dim() == 4 and k.dim() == 4 and q.shape[0] == k.shape[0], "q/k/v are [batch, seq, heads, dim]"
        self._check(q, k, v, dropout_p, softmax_scale)
        self.calls.append(("dense", q.shape, k.shape, causal))
        return torch.stack([_attention_emulated(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False):
        assert q.dim() == 3, "varlen q/k/v are [total, heads, dim]"
        self._check(q, k, v, dropout_p, softmax_scale)
        outs = []
        for cu, total, max_len in ((cu_seqlens_q, q.shape[0], max_seqlen_q), (cu_seqlens_k, k.shape[0], max_seqlen_k)):
            assert cu.dtype == torch.int32 and cu.dim() == 1, "cu_seqlens are int32 [documents + 1]"
            assert cu[0].item() == 0 and cu[-1].item() == total and bool((cu[1:] >= cu[:-1]).all())
            assert type(max_len) is int and max_len == int((cu[1:] - cu[:-1]).max())
        bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for i in range(len(bq) - 1):
            outs.append(_attention_emulated(q[bq[i]:bq[i + 1]], k[bk[i]:bk[i + 1]], v[bk[i]:bk[i + 1]],
                                            softmax_scale, causal))
        self.calls.append(("varlen", tuple(bq), causal))
        return torch.cat(outs)


@pytest.fixture
def flash(monkeypatch):
    emulation = _FlashAttnEmulation()
    monkeypatch.setitem(__import__("sys").modules, "flash_attn", emulation)
    return emulation


@pytest.fixture
def tp1():
    parallel_state.set_tensor_model_parallel_world_size(1)
    yield
    parallel_state.set_tensor_model_parallel_world_size(None)


def _config(heads=4, groups=2, dim=16):
    return TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads, num_query_groups=groups,
                             kv_channels=dim, attention_dropout=0.0, params_dtype=torch.bfloat16)


def _pair(mask_type):
    from megatron_vita.models.common.cuda_leaves import FlashAttention

    cfg = _config()
    return (FlashAttention(cfg, 1, mask_type, "self"), CoreAttention(cfg, 1, mask_type, "self"))


def test_leaf_choice():
    from megatron_vita.models.common.cuda_leaves import FlashAttention
    from megatron_vita.parallel.context.leaf import ContextParallelAttention

    cp1, cp2 = ParallelConfig(), ParallelConfig(context_parallel_size=2)
    flash = leaves_for(cp1, "cuda", ["use-flash-attn"])
    assert (flash.language_attention, flash.vision_attention) == (FlashAttention, FlashAttention)
    assert leaves_for(cp2, "cuda", ["use-flash-attn"]).language_attention is ContextParallelAttention
    assert leaves_for(cp2, "cuda", ["use-flash-attn"]).vision_attention is FlashAttention
    for backend, features in (("cuda", []), ("cpu", ["use-flash-attn"]), ("npu", ["use-flash-attn"])):
        plain = leaves_for(cp1, backend, features)  # NPU kernels arrive through mindspeed_patches' wrappers
        assert (plain.language_attention, plain.vision_attention) == (CoreAttention, CoreAttention), backend


@pytest.mark.parametrize("sq,sk,mask", [(7, 7, AttnMaskType.causal), (3, 9, AttnMaskType.causal),
                                         (5, 5, AttnMaskType.no_mask)], ids=["causal", "kv-cache-decode", "vit"])
def test_dense_glue_equals_the_sdpa_leaf(flash, tp1, sq, sk, mask):
    """sbhd -> bshd, GQA (4 query heads on 2 KV heads), the scale, and causal alignment for decode."""
    leaf, reference = _pair(mask)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sq, 2, 4, 16, generator=gen).bfloat16()
    k, v = (torch.randn(sk, 2, 2, 16, generator=gen).bfloat16() for _ in range(2))
    got = leaf(q, k, v, None, mask)
    want = reference(q.float(), k.float(), v.float(), None, mask)
    assert got.shape == want.shape == (sq, 2, 64) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    assert flash.calls == [("dense", (2, sq, 4, 16), (2, sk, 2, 16), mask == AttnMaskType.causal)]


def test_packed_glue_equals_the_sdpa_leaf(flash, tp1):
    """thd with int64 cu_seqlens from megatron (a 1-token document among them) -> int32, max lengths."""
    leaf, reference = _pair(AttnMaskType.causal)
    cu = torch.tensor([0, 1, 6, 9])
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5, max_seqlen_kv=5)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(9, 4, 16, generator=gen).bfloat16()
    k, v = (torch.randn(9, 2, 16, generator=gen).bfloat16() for _ in range(2))
    got = leaf(q, k, v, None, AttnMaskType.causal, packed_seq_params=params)
    want = reference(q.float(), k.float(), v.float(), None, AttnMaskType.causal, packed_seq_params=params)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    assert flash.calls == [("varlen", (0, 1, 6, 9), True)]


def test_the_emulation_rejects_what_flash_attn_rejects(flash, tp1):
    """A contract break fails in the emulation, so the glue tests above can catch one."""
    q = torch.randn(1, 4, 4, 16).bfloat16()
    with pytest.raises(AssertionError, match="fp16/bf16"):
        flash.flash_attn_func(q.float(), q.float(), q.float(), softmax_scale=0.25)
    with pytest.raises(AssertionError, match="multiple of KV heads"):
        flash.flash_attn_func(q, q[:, :, :3], q[:, :, :3], softmax_scale=0.25)
    t = q[0]
    with pytest.raises(AssertionError, match="int32"):
        flash.flash_attn_varlen_func(t, t, t, torch.tensor([0, 4]), torch.tensor([0, 4]), 4, 4, softmax_scale=0.25)
    leaf, _ = _pair(AttnMaskType.causal)
    with pytest.raises(RuntimeError, match="fp16/bf16"):
        leaf(torch.randn(3, 1, 4, 16), torch.randn(3, 1, 2, 16), torch.randn(3, 1, 2, 16), None, AttnMaskType.causal)
    assert math.isclose(leaf.softmax_scale, 0.25)


def test_missing_flash_attn_is_one_line(monkeypatch, tp1):
    from megatron_vita.models.common.cuda_leaves import FlashAttention

    monkeypatch.setitem(__import__("sys").modules, "flash_attn", None)  # `import flash_attn` raises ImportError
    with pytest.raises(RuntimeError) as e:
        FlashAttention(_config(), 1, AttnMaskType.causal, "self")
    assert str(e.value).startswith("--use-flash-attn: flash_attn does not import") and "\n" not in str(e.value)
