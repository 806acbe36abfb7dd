"""One rank of the generation engine: the loaded model chunks, prefill, decoding steps, sampling.

Owns what every rank does for a request once its prompt tensors are known everywhere:
 - the layout (TP / PP / VPP / CP; sequence parallelism is switched off: one decoded token
   does not split over TP) built as training builds it, weights from any checkpoint kind
   (`checkpoint.model_io.load_checkpoint_weights`), the KV cache installed in the LLM's
   core-attention leaves (kv_cache.py);
 - prefill in chunks of `prefill_chunk` tokens (the whole prompt by default): under CP every
   chunk is split over the CP ranks in the load-balanced order of training (2*CP chunks, padded
   at its end), the first chunk runs the training ring, later ones attend over the CP ranks'
   caches (kv_cache.Step). Only the last prompt position's logits are computed (the
   logits-masked head, `models.heads.language_model_logits` at one position), on the rank
   holding it;
 - the ViT once per tile: a chunk encodes only the tiles with feature tokens in this rank's
   share of it, and a tile straddling two chunks is kept until the next one has used it;
 - decoding: one token per forward, replicated on the CP ranks (one of them, in turn, keeps its
   keys), RoPE at its true position;
 - the pipeline by plain send / recv of the hidden states between stages in chunk order (a
   forward of one sequence needs no schedule), so decoding steps cost one hop per stage;
 - the next token chosen on the rank holding the logits (`sampling.choose`) and broadcast.
Nothing here asks which backend it runs on: kernels come with the leaves the layout selects.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_vita.config.dtypes import torch_dtype
from megatron_vita.config.model import ModelConfig
from megatron_vita.config.parallel import ParallelConfig
from megatron_vita.inference.engine.kv_cache import Step, install
from megatron_vita.inference.engine.sampling import Sampling, choose


class RankEngine:
    """This rank's model chunks with a KV cache; every method is collective over the world."""

    def __init__(self, cfg: ModelConfig, par: ParallelConfig, weights: Optional[Tuple[str, str]], dtype: str = "fp32",
                 prefill_chunk: Optional[int] = None):
        from megatron_vita.checkpoint.model_io import load_checkpoint_weights
        from megatron_vita.models.long_vita.builder import BuildOptions, build_model_chunks
        from megatron_vita.parallel.state import initialize_parallel
        from megatron_vita.platform import placement

        self.cfg = cfg
        self.par = dataclasses.replace(par, sequence_parallel=False)
        self.info = initialize_parallel(self.par)
        self.dtype = torch_dtype(dtype)
        self.device = placement.device()
        self.chunks = build_model_chunks(cfg, self.par, BuildOptions(params_dtype=self.dtype))
        # weights None: the build's own initialisation (benchmarks).
        self.loaded_how = "initialised" if weights is None else \
            load_checkpoint_weights(self.chunks, weights[0], weights[1], cfg, self.par)
        for chunk in self.chunks:
            chunk.eval()
        self.cache = install(self.chunks)
        self.prefill_chunk = prefill_chunk
        self.cp, self.cp_rank = self.par.cp, self.info.cp_rank
        self.cp_group = ps.get_context_parallel_group() if self.cp > 1 else None
        self.pp = self.par.pp
        self.rank = dist.get_rank()
        where = [None] * dist.get_world_size()
        dist.all_gather_object(where, (self.info.tp_rank, self.info.pp_rank, self.info.cp_rank))
        self._global = {w: r for r, w in enumerate(where)}
        self._next = self._global[(self.info.tp_rank, (self.info.pp_rank + 1) % self.pp, self.cp_rank)]
        self._prev = self._global[(self.info.tp_rank, (self.info.pp_rank - 1) % self.pp, self.cp_rank)]
        self._features: Dict[int, torch.Tensor] = {}

    # ---- one forward through the pipeline ------------------------------------------------------
    def _rope(self, positions: torch.Tensor) -> torch.Tensor:
        """RoPE of the given true positions, as megatron's RotaryEmbedding builds it for 0..s-1."""
        rotary = self.chunks[0].language_model.rotary_pos_emb
        inv = rotary.inv_freq.to(self.device)
        freqs = torch.outer(positions.to(device=self.device, dtype=inv.dtype), inv)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]

    def _embed(self, chunk, ids: torch.Tensor, positions: torch.Tensor, visual) -> torch.Tensor:
        from megatron_vita.models.long_vita.model import scatter_features

        emb = chunk.language_model.embedding(input_ids=ids[None], position_ids=positions[None])
        if visual is not None:
            features, indices = visual
            emb = scatter_features(emb, features, indices)
        return emb

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, step: Step, visual=None,
                logits_at: Optional[int] = None) -> Optional[torch.Tensor]:
        """This rank's tokens `ids` at true `positions` through every stage; the vocabulary logits
        [V] at local index `logits_at` on the last stage (None elsewhere or when not asked)."""
        from megatron_vita.models.heads import language_model_logits

        rope = self._rope(positions)
        shape = (ids.shape[0], 1, self.cfg.language.hidden_size)
        out = None
        self.cache.step = step
        try:
            for chunk in self.chunks:
                lm = chunk.language_model
                if chunk.pre_process:
                    hidden = self._embed(chunk, ids, positions, visual)
                else:
                    hidden = torch.empty(shape, dtype=self.dtype, device=self.device)
                    dist.recv(hidden, src=self._prev)
                    lm.decoder.set_input_tensor(hidden)
                hidden = lm.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
                if not chunk.post_process:
                    dist.send(hidden.contiguous(), dst=self._next)
                elif logits_at is not None:
                    at = torch.tensor([logits_at], device=self.device)
                    logits = language_model_logits(lm.output_layer, hidden, lm.config, positions=at, gather_output=True)
                    out = logits[0, 0, :self.cfg.language.vocab_size].float()
        finally:
            self.cache.step = None
        return out

    def holder(self, cp_rank: int) -> int:
        """Global rank holding the logits of CP rank `cp_rank`: TP rank 0 of the last stage."""
        return self._global[(0, self.pp - 1, cp_rank)]

    # ---- prefill -------------------------------------------------------------------------------
    def _chunk_share(self, a: int, b: int):
        """(true positions, keep mask or None) of this rank's share of prompt chunk [a, b)."""
        if self.cp == 1:
            return torch.arange(a, b, device=self.device), None
        from megatron_vita.parallel.context.layout import SeqLayout

        length = b - a
        padded = -(-length // (2 * self.cp)) * 2 * self.cp
        positions = a + SeqLayout.single(padded, self.cp).indices(self.cp_rank).to(self.device)
        return positions, positions < b

    def _visual(self, pixels: Optional[torch.Tensor], tile_pos: Optional[torch.Tensor], positions: torch.Tensor,
                end: int):
        """(features, local image_indices) of the tiles with a feature token among `positions`.

        Each tile is encoded once per request: a tile with tokens at or past `end` (the chunk's
        end) stays cached for the next chunk; the others are dropped once used."""
        if pixels is None or tile_pos is None or tile_pos.numel() == 0 or not self.chunks[0].pre_process:
            return None  # only the first pipeline stage embeds
        local = torch.full((int(positions.max()) + 1,), -1, dtype=torch.long, device=self.device)
        local[positions] = torch.arange(positions.numel(), device=self.device)
        idx = local[tile_pos.clamp(max=local.numel() - 1)]
        idx = torch.where(tile_pos < local.numel(), idx, torch.full_like(idx, -1))
        keep = (idx >= 0).any(dim=1)
        tiles = keep.nonzero().flatten().tolist()
        if not tiles:
            return None
        missing = [t for t in tiles if t not in self._features]
        if missing:
            chunk = self.chunks[0]
            feats = chunk.vision_projection(chunk.vision_model(pixels[missing].to(self.device, self.dtype)))
            self._features.update(zip(missing, feats))
        features = torch.stack([self._features[t] for t in tiles])
        for t in tiles:
            if int(tile_pos[t].max()) < end:
                del self._features[t]
        return features, torch.stack([torch.zeros_like(idx[keep]), idx[keep]])

    def prefill(self, ids: torch.Tensor, pixels: Optional[torch.Tensor] = None,
                chunk: Optional[int] = None) -> Tuple[Optional[torch.Tensor], int]:
        """Fill the (reset) cache with prompt `ids` [P]; returns (logits of position P-1 on the
        rank holding them, else None; that rank's global rank)."""
        from megatron_vita.models.common.visual_tokens import context_token_indices

        P = ids.shape[0]
        ids = ids.to(self.device)
        tile_pos = None
        if pixels is not None and pixels.shape[0] > 0:
            tile_pos = context_token_indices(ids[None], self.cfg.tokens.context_ids, self.cfg.num_image_token,
                                             pixels.shape[0])[1]
        self._features.clear()
        self.cache.reset(self.cache.reserved)  # the first chunk's ring mode starts from an empty cache
        size = chunk or self.prefill_chunk or P
        logits, owner = None, 0
        for a in range(0, P, size):
            b = min(a + size, P)
            positions, keep = self._chunk_share(a, b)
            local_ids = ids[positions.clamp(max=P - 1)]
            if keep is not None:
                local_ids = torch.where(keep, local_ids, torch.full_like(local_ids, self.cfg.tokens.pad_token_id))
            if self.cp == 1:
                step = Step("local", positions)
            else:
                step = Step("ring" if a == 0 else "gather", positions, keep, self.cp_group)
            last = (positions == P - 1).nonzero().flatten().tolist() if b == P else []
            if b == P and self.cp > 1:
                owner = _owner_of(P - 1 - a, b - a, self.cp)
            out = self.forward(local_ids, positions, step, self._visual(pixels, tile_pos, positions, b),
                               logits_at=last[0] if last else None)
            if b == P:
                logits = out
        self._features.clear()
        return logits, self.holder(owner)

    def decode(self, token: int, position: int, index: int) -> Tuple[Optional[torch.Tensor], int]:
        """One new token at `position` (the `index`-th decoded); (its logits on the holder, holder)."""
        ids = torch.tensor([token], device=self.device)
        positions = torch.tensor([position], device=self.device)
        if self.cp == 1:
            return self.forward(ids, positions, Step("local", positions), logits_at=0), self.holder(0)
        keep = torch.tensor([index % self.cp == self.cp_rank], device=self.device)
        step = Step("decode", positions, keep, self.cp_group)
        return self.forward(ids, positions, step, logits_at=0 if self.cp_rank == 0 else None), self.holder(0)

    def cache_bytes(self) -> int:
        """Bytes of the KV cache buffers on this rank (all layers, as reserved)."""
        return sum(t.numel() * t.element_size() for kv in self.cache.layers.values() if kv.k is not None
                   for t in (kv.k, kv.v))

    def reserve_for(self, prompt: int, new_tokens: int) -> int:
        """KV entries this rank will hold for a prompt and `new_tokens` answer tokens."""
        if self.cp == 1:
            return prompt + new_tokens
        size = self.prefill_chunk or prompt
        share = sum(-(-(min(a + size, prompt) - a) // (2 * self.cp)) * 2 for a in range(0, prompt, size))
        return share + -(-new_tokens // self.cp)

    # ---- a whole request -----------------------------------------------------------------------
    def steps(self, ids: torch.Tensor, pixels: Optional[torch.Tensor], sampling: Sampling,
              stop_ids: Sequence[int], recorded: Optional[list] = None) -> Iterator[int]:
        """Every rank: prefill, then decode until a stop token or the budget, yielding each chosen
        token as it is known (on every rank). (index, logits) of each token chosen on this rank
        are appended to `recorded`. Must be run to its end on every rank."""
        P = ids.shape[0]
        budget = sampling.budget(P)
        self.cache.reset(self.reserve_for(P, budget))
        gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        history = ids.tolist()
        count = 0
        with torch.no_grad():
            logits, holder = self.prefill(ids, pixels)
            while True:
                chosen = torch.zeros(1, dtype=torch.long, device=self.device)
                if self.rank == holder:
                    if recorded is not None:
                        recorded.append((count, logits.cpu()))
                    chosen[0] = choose(logits, history, sampling, gen)
                dist.broadcast(chosen, src=holder)
                token = int(chosen.item())
                history.append(token)
                count += 1
                yield token
                if token in stop_ids or count >= budget:
                    break
                logits, holder = self.decode(token, P + count - 1, count - 1)
        self.cache.reset()

    def generate(self, ids: torch.Tensor, pixels: Optional[torch.Tensor], sampling: Sampling,
                 stop_ids: Sequence[int], recorded: Optional[list] = None) -> List[int]:
        """`steps` to the end: the answer's token ids (the stop token included when one ended it)."""
        return list(self.steps(ids, pixels, sampling, stop_ids, recorded))

    def close(self) -> None:
        from megatron_vita.parallel.state import destroy_parallel

        destroy_parallel()


def _owner_of(index: int, length: int, cp: int) -> int:
    """CP rank holding token `index` of a chunk of `length` tokens split load-balanced over `cp`."""
    padded = -(-length // (2 * cp)) * 2 * cp
    piece = index // (padded // (2 * cp))
    return piece if piece < cp else 2 * cp - 1 - piece
