"""Per-device memory of a training configuration: the table of terms, per pipeline stage.

Owns how the counted pieces (params.py, activations.py) add up on one device at its peak:

  weights, gradients, optimizer   params.static_terms
  batch        each micro-batch in flight: token ids, labels, loss mask, positions for the whole
               sequence, and on the first stage the fp32 pixels of this rank's tiles
  activations  what one micro-batch keeps for backward on this stage's layers (recompute as given)
  vision       the ViT + projector on the first stage, over this CP rank's tiles
  head         final norm + logits-masked LM head + loss on the last stage
  in flight    1F1B keeps PP - rank micro-batches of activations on a stage (first stage: PP;
               interleaved: megatron's warm-up count), with the stage's p2p output / input tensors
  working      freed during the step but live at the peak: one layer's backward gradients, the
               recomputed unit, the head's logits

The peak of a stage is weights + gradients + optimizer + batch + (in-flight - 1) x held
micro-batches + the micro-batch in backward (its saved tensors and the largest working set).
The device's figure is the largest stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from megatron_vita.estimate import activations as act
from megatron_vita.estimate.inputs import EstimateInputs
from megatron_vita.estimate.params import stage_layers, static_terms, vocab_rows

GIB = 1024 ** 3

MODELLED = (
    "weights, fp32 main_grad, Adam state (+ fp32 master for bf16), the batch, saved activations per layer (TP, "
    "SP, CP, recompute), ViT + projector on the first stage, LM head + loss, pipeline micro-batches in flight, "
    "the largest working set (a layer's backward, the rebuilt recompute unit, the head's logits, the vision forward)",
)
NOT_MODELLED = (
    "allocator fragmentation and caching, communication buffers (NCCL/HCCL/gloo), the CUDA/CANN context and "
    "kernels' workspaces, fused kernels that keep less (TE / npu_fusion_attention / npu_rms_norm: modelled as "
    "this project's plain-torch leaves), the optimizer step's temporaries, checkpoint saving",
)


@dataclass
class Term:
    name: str
    bytes: int
    detail: str = ""


@dataclass
class StageEstimate:
    pp_rank: int
    terms: List[Term] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    def get(self, name: str) -> int:
        return sum(t.bytes for t in self.terms if t.name == name)


@dataclass
class MemoryEstimate:
    inputs: EstimateInputs
    stages: List[StageEstimate]

    @property
    def peak_stage(self) -> StageEstimate:
        return max(self.stages, key=lambda s: s.total)

    @property
    def total(self) -> int:
        return self.peak_stage.total

    @property
    def fits(self) -> Optional[bool]:
        mem = self.inputs.device_memory_gib
        return None if mem is None else self.total <= mem * GIB


def tiles_per_rank(inputs: EstimateInputs) -> int:
    """Tiles whose features this CP rank holds: each rank encodes only those (a tile straddling
    a chunk boundary is encoded by both neighbours), so about tiles / CP, plus one."""
    cp = inputs.parallel.cp
    if cp == 1 or inputs.tiles == 0:
        return inputs.tiles
    return min(inputs.tiles, math.ceil(inputs.tiles / cp) + 1)


def in_flight(inputs: EstimateInputs, pp_rank: int) -> float:
    """Micro-batches whose activations a stage holds at its peak (megatron's 1F1B warm-up + 1).

    With a virtual pipeline, interleaved 1F1B runs (PP - rank - 1) * 2 + (VPP - 1) * PP warm-up
    chunk passes, + 1, each holding 1/VPP of the stage's layers: the count is in whole-stage
    micro-batches, so it may be fractional."""
    par = inputs.parallel
    if par.pp == 1:
        return 1
    if par.vpp:
        chunks = (par.pp - pp_rank - 1) * 2 + (par.vpp - 1) * par.pp + 1
        total = (inputs.micro_batches or chunks) * par.vpp
        return max(1.0, min(chunks, total) / par.vpp)
    n = par.pp - pp_rank
    return min(n, inputs.micro_batches) if inputs.micro_batches else n


def _batch(inputs: EstimateInputs, pp_rank: int, flight: float) -> Term:
    v = inputs.model.vision
    tokens = 28 * inputs.seq_length * inputs.micro_batch_size  # ids, labels, positions (int64), loss mask (fp32)
    pixels = 0
    if pp_rank == 0:
        pixels = 4 * tiles_per_rank(inputs) * inputs.micro_batch_size * v.num_channels * v.image_size ** 2
    n = math.ceil(flight)
    return Term("batch", n * (tokens + pixels),
                f"{n} micro-batch(es) in flight: ids/labels/positions/mask" + (" + fp32 pixels" if pixels else ""))


def _recompute_units(inputs: EstimateInputs, layers: int) -> Tuple[int, int, int]:
    """(units whose input only is kept, layers kept whole, layers rebuilt at once in backward)."""
    gran, method, n = inputs.recompute_granularity, inputs.recompute_method, inputs.recompute_num_layers
    if gran != "full" or layers == 0:
        return 0, layers, 0
    n = min(n or 1, layers)
    if method == "block":
        return n, layers - n, 1
    return math.ceil(layers / n), 0, n


def _llm_terms(inputs: EstimateInputs, pp_rank: int, t: act.Tokens) -> Tuple[int, int, str]:
    """(bytes kept per micro-batch by the stage's layers, working set of their backward, detail)."""
    model = inputs.model
    layers = stage_layers(model, inputs.parallel, pp_rank)
    selective = inputs.recompute_granularity == "selective"
    full_layer = act.llm_layer_saved(model, t, selective)
    units, whole, rebuilt = _recompute_units(inputs, layers)
    kept = units * act.layer_input(model, t) + whole * full_layer
    working = act.llm_layer_backward_working(model, t)
    if rebuilt:
        # Backward runs the whole layers first (block method) and frees them before any unit is
        # rebuilt, so a rebuilt unit only adds what exceeds them.
        working += max(0, act.recompute_unit(model, t, rebuilt) - whole * full_layer)
        detail = (f"full recompute: {units} kept input(s) x {act.layer_input(model, t) / 2**20:.1f} MiB"
                  + (f" + {whole} whole layer(s)" if whole else "") + f"; {rebuilt} layer(s) rebuilt in backward")
    else:
        detail = f"{layers} layers x {full_layer / 2**20:.1f} MiB" + (" (selective recompute)" if selective else "")
    return kept, working, detail


def _vision_terms(inputs: EstimateInputs, t: act.Tokens) -> Tuple[int, int, str]:
    """(bytes the ViT + projector keep per micro-batch, peak of the vision/embedding forward, detail)."""
    model, tp, a = inputs.model, inputs.parallel.tp, t.a
    tiles = tiles_per_rank(inputs) * inputs.micro_batch_size
    embed = act.embedding_forward_working(model, t, tiles)
    if tiles == 0:
        return 0, embed, "no tiles"
    layers = model.vision.num_layers
    kept = 0
    if inputs.train_vision:
        gran, method, n = inputs.recompute_granularity, inputs.recompute_method, inputs.recompute_num_layers
        vit_layer = act.vit_layer_saved(model, tiles, tp, a, selective=gran == "selective")
        if a != 4:  # the patch conv keeps its input, the pixels cast to the activation dtype
            v = model.vision
            kept += a * tiles * v.num_channels * v.image_size ** 2
        if gran == "full":  # the ViT takes the LLM's recompute settings
            n = min(n or 1, layers)
            units = n if method == "block" else math.ceil(layers / n)
            whole = layers - n if method == "block" else 0
            kept += units * act.vit_layer_input(model, tiles, a) + whole * vit_layer
        else:
            kept += layers * vit_layer
    if inputs.train_vision or inputs.train_projector:
        kept += act.projector_saved(model, tiles, tp, a)
    forward = kept + max(act.vit_forward_working(model, tiles, tp, a), embed)
    return kept, forward, f"{tiles} tile(s) on this rank, ViT {'trained' if inputs.train_vision else 'frozen'}"


def estimate(inputs: EstimateInputs) -> MemoryEstimate:
    """The memory table of every pipeline stage (inputs are validated first)."""
    from megatron_vita.parallel.context.validate import ulysses_degree_for

    inputs.validate()
    par, model = inputs.parallel, inputs.model
    t = act.Tokens(seq=inputs.seq_length // par.cp, batch=inputs.micro_batch_size, tp=par.tp,
                   sequence_parallel=par.sequence_parallel, a=inputs.activation_bytes, cp=par.cp,
                   ulysses=ulysses_degree_for(par.context_parallel_algo, par.cp, par.ulysses_degree_in_cp)
                   if par.cp > 1 else 1)
    h = model.language.hidden_size
    rows = inputs.supervised * inputs.micro_batch_size
    stages = []
    for pp_rank in range(par.pp):
        first, last = pp_rank == 0, pp_rank == par.pp - 1
        flight = in_flight(inputs, pp_rank)
        st = StageEstimate(pp_rank, [Term(*x) for x in static_terms(inputs, pp_rank)] + [_batch(inputs, pp_rank, flight)])
        kept, backward, detail = _llm_terms(inputs, pp_rank, t)
        st.terms.append(Term("activations", kept, detail))
        held = kept
        # The working set is the largest of the phases of the micro-batch in hand, each measured
        # against what that micro-batch holds once its forward is done (`held`).
        phases = {"a layer's backward" + (" + the rebuilt unit" if inputs.recompute_granularity == "full" else ""):
                  backward}
        forward_tail = 0
        if first:
            vkept, vforward, vdetail = _vision_terms(inputs, t)
            emb = act.embedding_saved(t, h, par.sequence_parallel and not inputs.bf16)
            st.terms.append(Term("vision", vkept, vdetail))
            st.terms.append(Term("embedding", emb, "token ids kept for the embedding's backward"))
            held += vkept + emb
            if inputs.bf16:
                # The stage's forward references its decoder input (the whole local sequence, before
                # the SP scatter) to its end; in fp32 it is the first layer's saved norm input anyway.
                forward_tail = act.layer_input(model, t) * (t.tp if par.sequence_parallel else 1)
            if not last:
                phases["the end of the forward"] = forward_tail
        if not last:
            # The schedule keeps each in-flight micro-batch's output (and, past the first stage,
            # its received input when it is not already a saved fp32 norm input).
            p2p = act.layer_input(model, t) * (1 if first or not inputs.bf16 else 2)
            st.terms.append(Term("pipeline buffers", p2p, "stage output (and input) per micro-batch in flight"))
            held += p2p
        if last:
            vr = vocab_rows(model, par)
            head_rows = rows if inputs.logits_mask else t.s
            head_kept = act.head_saved(model, t, vr, rows, inputs.logits_mask)
            what = f"k={rows} supervised rows" if inputs.logits_mask else f"full logits, {t.s} rows"
            st.terms.append(Term("head", head_kept, f"{what} x {vr} vocab rows (fp32 softmax)"))
            phases["the head's logits"] = act.head_working(vr, head_rows, t.a) + forward_tail
        if first:
            # Before the layers run, this micro-batch holds only what the vision keeps.
            phases["the vision / embedding forward"] = vforward - held
        if flight > 1:
            st.terms.append(Term("in flight", round((flight - 1) * held),
                                 f"{flight - 1:g} more micro-batch(es) held by 1F1B on stage {pp_rank}"))
        which = max(phases, key=phases.get)
        st.terms.append(Term("working", max(0, phases[which]), f"largest transient: {which}"))
        stages.append(st)
    return MemoryEstimate(inputs, stages)
