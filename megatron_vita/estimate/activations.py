"""Activation memory of one micro-batch, counted tensor by tensor from what autograd keeps.

Owns the bytes each part of Long-VITA keeps for its backward pass, as this project's layers run
on megatron-core 0.12.1 (plain-torch leaves: models/common/norms.py, models/common/attention.py,
models/heads.py). The counts were read off the saved tensors of real layers (torch's
saved_tensors_hooks, one entry per storage) and are checked the same way by
`tests/estimate/test_saved_tensors.py`. Notation, per TP rank: s tokens of the micro-batch on
this CP rank, n = s/TP under sequence parallelism (else s) for norms and residuals, h hidden,
hq/hkv query/KV heads per rank, d head dim, f FFN width per rank, a activation bytes (2 bf16, 4 fp32).

Qwen2 layer, per token (bytes):
  each RMSNorm (x2): its input in fp32 (4h: in fp32 runs this IS the layer input / residual),
      rsqrt (4), normalised (a*h), and the output kept by the next linear (a*h)          on n
  RoPE: cos and sin of q and of k, [s, 1, 1, d] each                                 4*a*d per position
  attention: rotated q (hq*d), rotated k (hkv*d), the fused QKV output (kept whole by the
      un-rotated v view: (hq + 2*hkv)*d), the output (hq*d, also linear_proj's input), all a;
      log-sum-exp 4*hq (dropped by selective recompute, which keeps q/k/v and a new output)
  SwiGLU MLP: fc1 output 2f (kept by the SiLU and the up view), SiLU output f, product f, all a
Full recompute keeps only each recompute unit's input (a*h on n tokens); the unit being
recomputed rebuilds its layers' tensors during backward.

InternViT layer (no SP, no RoPE), per token: a*(6C + 4C/TP + 2F/TP) + 4*(heads/TP + 4): inputs and
outputs of both LayerNorms, the layer-scaled branch outputs, QKV (kept whole), attention output,
GELU input and output. Projector per feature token: a*(8C + 2F_p/TP): LayerNorm input and output,
GELU input and output. A trained ViT in bf16 also keeps the bf16 copy of its pixels (patch conv). Nothing is kept by a frozen part unless a trained part follows it.

Working memory (freed within the step, but live at the peak): the gradients of one layer's
backward, the logits and loss of the head, and the recomputed unit under full recompute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_vita.config.model import ModelConfig


@dataclass(frozen=True)
class Tokens:
    """The token counts of one micro-batch on one (CP, TP) rank and the activation dtype."""

    seq: int  # positions of the sequence on this CP rank (S / CP)
    batch: int  # micro-batch size
    tp: int
    sequence_parallel: bool
    a: int  # bytes of an activation element: 2 (bf16) or 4 (fp32)
    cp: int = 1
    ulysses: int = 1  # Ulysses degree inside CP: 1 for ring, CP for ulysses, --ulysses-degree-in-cp for hybrid
    tile: int = 1024  # rows of a block of the CP attention (parallel.context.blocks.DEFAULT_TILE)

    @property
    def s(self) -> int:
        """Tokens every attention/MLP tensor holds (full local sequence, all of the micro-batch)."""
        return self.seq * self.batch

    @property
    def n(self) -> int:
        """Tokens the norms and residual stream hold: split over TP under sequence parallelism."""
        return self.s // self.tp if self.sequence_parallel else self.s


def _heads(model: ModelConfig, tp: int):
    lm = model.language
    return lm.num_attention_heads // tp, lm.num_query_groups // tp, lm.kv_channels, lm.ffn_hidden_size // tp


def cp_kv_heads(model: ModelConfig, t: Tokens) -> int:
    """KV heads per TP rank as the CP attention holds them: repeated until the Ulysses degree
    divides them (parallel.context.attention.kv_repeats); unchanged for ring."""
    hq, hkv, _, _ = _heads(model, t.tp)
    return hkv * (t.ulysses // math.gcd(hkv, t.ulysses))


def rmsnorm_saved(h: int, t: Tokens) -> int:
    """One RMSNorm: fp32 input, rsqrt, normalised output; plus its output kept by the next linear."""
    return t.n * (4 * h + 4 + 2 * t.a * h)


def attention_saved(model: ModelConfig, t: Tokens, selective: bool = False) -> int:
    """Core attention and what around it is kept for it (after the QKV linear, before linear_proj).

    CP 1 (torch SDPA): rotated q and k, the fused QKV output (the un-rotated v is a view of it),
    the output (also linear_proj's input, SDPA writes it token-major), log-sum-exp.
    CP > 1 (parallel.context ring, Ulysses, hybrid): contiguous copies of q, k, v (k and v with
    their Ulysses repeats) and the output in [b, heads, s, d], fp32 log-sum-exp, and linear_proj's
    own token-major copy of the output; the QKV output and the rotated q/k are not kept.
    Selective recompute keeps the core attention's inputs (q, k, QKV) and its output."""
    hq, hkv, d, _ = _heads(model, t.tp)
    if selective:
        # + megatron's one-element mask-type tensor the checkpoint keeps
        return t.a * t.s * d * (hq + hkv + (hq + 2 * hkv) + hq) + 4
    if t.cp == 1:
        return t.a * t.s * d * (hq + hkv + (hq + 2 * hkv) + hq) + 4 * t.s * hq
    return t.a * t.s * d * (3 * hq + 2 * cp_kv_heads(model, t)) + 4 * t.s * hq


def llm_layer_saved(model: ModelConfig, t: Tokens, selective: bool = False) -> int:
    """Bytes one Qwen2 layer keeps for backward (no recompute, or selective recompute)."""
    h = model.language.hidden_size
    _, _, d, f = _heads(model, t.tp)
    norms = 2 * rmsnorm_saved(h, t)
    rope = 4 * t.a * t.seq * d
    mlp = t.a * t.s * 4 * f
    return norms + rope + attention_saved(model, t, selective) + mlp


def attention_backward_working(model: ModelConfig, t: Tokens) -> int:
    """What the core attention's backward allocates beyond the saved tensors.

    CP 1: dq, dk, dv next to the output gradient, (2*hq + 2*hkv)*d in the activation dtype.
    CP > 1 (ring.py): the contiguous output gradient (a*hq*d), fp32 dq (4*hq*d) and delta (4*hq),
    the K/V block in use and the next one arriving (2 x 2*hkv*d, activation dtype), three fp32 dK/dV
    accumulators (this step's, the one arriving, the one leaving: 3 x 2*hkv*d), and the fp32 block
    workspace of one tile pair: P and dS, [heads, tile, tile] each (blocks.py computes in place)."""
    hq, hkv, d, _ = _heads(model, t.tp)
    if t.cp == 1:
        return t.a * t.s * (2 * hq + 2 * hkv) * d
    kv = cp_kv_heads(model, t)
    rows = t.s * t.ulysses  # the ring's sequence after the Ulysses all-to-all (heads / U)
    tile_workspace = 2 * 4 * (hq // t.ulysses) * min(t.tile, rows) * min(t.tile, rows // t.batch)
    return t.s * (t.a * hq * d + 4 * hq * d + 4 * hq + 4 * t.a * kv * d + 24 * kv * d) + tile_workspace


def layer_input(model: ModelConfig, t: Tokens) -> int:
    """The hidden states entering a layer (what a full-recompute unit keeps)."""
    return t.a * t.n * model.language.hidden_size


def llm_layer_backward_working(model: ModelConfig, t: Tokens) -> int:
    """Gradients alive at the worst moment of one layer's backward, beyond the saved tensors still held.

    The gradient of the layer output (n*h) stays until the residual branch adds its part; under SP
    its all-gathered copy (s*h) joins it inside the row-parallel linears' backward. The MLP runs
    first: one MLP-wide gradient (s*f) is alive at a time beyond what it frees (fc2's input
    gradient; then the SiLU's and the up half's as fc2 and the product free their inputs; then
    fc1's output gradient as the fc1 output is freed). The core attention's backward comes after
    the MLP, the second norm and linear_proj have freed what they kept, so it only counts beyond that."""
    h = model.language.hidden_size
    hq, _, d, f = _heads(model, t.tp)
    grad_out = t.a * t.n * h + (t.a * t.s * h if t.sequence_parallel else 0)
    freed = t.a * t.s * (4 * f + hq * d) + rmsnorm_saved(h, t)
    return grad_out + max(t.a * t.s * f, attention_backward_working(model, t) - freed)


def recompute_unit(model: ModelConfig, t: Tokens, layers: int, selective: bool = False) -> int:
    """What a full-recompute unit of `layers` layers rebuilds in backward: their saved tensors and the
    unit's output (held while its backward runs). In fp32 the first layer's saved norm input is the
    kept unit input itself, so it is not counted twice."""
    again = 4 * t.n * model.language.hidden_size if t.a == 4 else 0
    return layers * llm_layer_saved(model, t, selective) + layer_input(model, t) - again


def vit_tokens(model: ModelConfig) -> int:
    return model.vision.seq_length


def vit_layer_saved(model: ModelConfig, tiles: int, tp: int, a: int, selective: bool = False) -> int:
    """Bytes one InternViT layer keeps for backward over `tiles` tiles (trained ViT). The two
    LayerNorms also keep mean and rstd (activation dtype), SDPA an fp32 log-sum-exp per head
    (dropped by selective recompute, which keeps a one-element mask-type tensor instead)."""
    v = model.vision
    c, f = v.hidden_size, v.ffn_hidden_size
    tokens = tiles * vit_tokens(model)
    lse = 0 if selective else 4 * (v.num_attention_heads // tp)
    return tokens * (a * (6 * c + 4 * c // tp + 2 * f // tp) + 4 * a + lse) + (4 if selective else 0)


def vit_forward_working(model: ModelConfig, tiles: int, tp: int, a: int) -> int:
    """What one InternViT layer's forward holds at once beyond what autograd keeps (all of it when
    the ViT is frozen): the residual, the LayerNorm output and the branch output (3C) next to the
    attention's QKV and output (4C/TP) or the MLP's fc1 output, biased copy and GELU (3F/TP)."""
    v = model.vision
    c, f = v.hidden_size, v.ffn_hidden_size
    return a * tiles * vit_tokens(model) * (3 * c + max(4 * c // tp, 3 * f // tp))


def embedding_forward_working(model: ModelConfig, t: Tokens, tiles: int) -> int:
    """Building the decoder input: the projected features of the rank's tiles, the word embeddings
    and their token-major copy, then the copy with the features written in (two [s, h] at a time)."""
    return t.a * (tiles * model.num_image_token * model.language.hidden_size + 2 * t.s * model.language.hidden_size)


def vit_layer_input(model: ModelConfig, tiles: int, a: int) -> int:
    return a * tiles * vit_tokens(model) * model.vision.hidden_size


def projector_saved(model: ModelConfig, tiles: int, tp: int, a: int) -> int:
    """Bytes the projector keeps for backward (trained projector, or a trained ViT below it)."""
    c4 = model.projector_input_size
    tokens = tiles * model.num_image_token
    return tokens * a * (2 * c4 + 2 * model.projector.ffn_hidden_size // tp + 2)  # + LayerNorm mean, rstd


def head_saved(model: ModelConfig, t: Tokens, vocab_rows: int, rows: int, logits_mask: bool) -> int:
    """Final norm + LM head + loss: what is kept until the head's backward.

    Masked head: the boolean mask of the positions, the k selected hidden rows (gathered from the
    SP ranks, with the int64 indices that drop their padding) and the fp32 softmax [k, V/TP] that
    megatron's vocab-parallel cross entropy keeps (computed in place), with its target mask and
    int64 targets. Full head: the [s, h] input of the output layer (gathered under SP) and the
    [s, V/TP] softmax with the same per-row extras."""
    h = model.language.hidden_size
    norm = t.n * (4 * h + 4 + t.a * h)
    if logits_mask:
        return (norm + t.s + rows * (t.a * h + 4 * vocab_rows + 9)
                + (8 * rows if t.sequence_parallel else 0))
    return norm + t.s * (t.a * h + 4 * vocab_rows + 9)


def head_working(vocab_rows: int, rows: int, a: int) -> int:
    """Beyond the kept softmax: the logits in the activation dtype when they are not fp32 (the fp32
    copy is what the loss turns into the softmax), and its gradient of the same size in backward."""
    return (a if a != 4 else 0) * rows * vocab_rows


def embedding_saved(t: Tokens, hidden: int, first_layer_keeps_full: bool) -> int:
    """Token ids kept by the embedding's backward (int64; with TP also the bool mask of the ids
    outside this rank's vocabulary). Under SP in fp32 the first layer's saved input is a view into
    the full [s, h] embedding output (megatron's scatter returns a slice), so the whole of it stays."""
    ids = 8 * t.s + (t.s if t.tp > 1 else 0)
    return ids + ((t.s - t.n) * 4 * hidden if first_layer_keeps_full else 0)
