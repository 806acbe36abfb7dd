"""The HF generation path: a Long-VITA HF directory answered by transformers' `generate`.

Owns `HFGenerator`, the `Generator` (inference/api.py) over the transformers classes of
`megatron_vita.hf`: the prompt comes from `inference.prompt.build_prompt` (the training
pipeline's layout), the model runs on the platform's device (`platform.placement.device`), and
decoding is transformers' `generate` with its KV cache (the images go in at prefill only; see
LongVITAForCausalLM.prepare_inputs_for_generation). Greedy unless the request samples; the
sampling options are all set explicitly, so the checkpoint's own generation_config (released:
temperature 0.7, top_p 0.8, top_k 20, repetition penalty 1.05) never changes a request's
meaning (the model's generation_config is replaced by a neutral one too, so that an option
the request does not set is not filled from it either). Generation stops at `<|im_end|>` or `<|endoftext|>`.

`stream` runs the same `generate` call on a worker thread whose streamer hands each new token
id over a queue (ids only, no tensors); the caller's thread detokenizes them incrementally
(inference/text.py). Closing the stream early (a client that went away) stops the generation at
the next token. One request runs at a time per generator (a lock).
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Iterator, List, Optional, Tuple

from megatron_vita.config.parallel import ConfigError
from megatron_vita.inference.api import GenerationRequest, GenerationResult
from megatron_vita.inference.text import (
    IncrementalDetokenizer, detokenize, finish_reason, new_token_budget, stop_token_ids,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def hf_dir_problems(model_dir: str, tokenizer: Optional[str] = None) -> List[str]:
    """One line per missing piece of an HF Long-VITA directory (config, weights, tokenizer)."""
    if not os.path.isdir(model_dir):
        return [f"--model_path {model_dir}: no such directory"]
    out = []
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        out.append(f"--model_path {model_dir}: no config.json (not a Hugging Face checkpoint directory)")
    names = os.listdir(model_dir)
    if not any(n.endswith((".safetensors", ".bin")) for n in names):
        out.append(f"--model_path {model_dir}: no weights (*.safetensors / *.bin)")
    tok = tokenizer or model_dir
    if not os.path.isdir(tok):
        out.append(f"--tokenizer {tok}: no such directory")
    elif not any(os.path.isfile(os.path.join(tok, n)) for n in TOKENIZER_FILES):
        flag = "--tokenizer" if tokenizer else "--model_path"
        out.append(f"{flag} {tok}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); "
                   "pass --tokenizer DIR")
    return out


class _TokenQueue:
    """transformers streamer: each new token id onto a queue (the prompt, sent first, is skipped)."""

    def __init__(self):
        self.queue: "queue.Queue" = queue.Queue()
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for tid in value.reshape(-1).tolist():
            self.queue.put(int(tid))

    def end(self) -> None:
        pass  # the worker thread signals the end itself, also when generate raises


_END = object()


class HFGenerator:
    """`Generator` over a Long-VITA HF directory (transformers' generate with its KV cache)."""

    def __init__(self, model_dir: str, backend: Optional[str] = None, dtype: str = "fp32",
                 tokenizer: Optional[str] = None):
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        import megatron_vita  # noqa: F401  (registers the Long-VITA classes with the Auto classes)
        from megatron_vita.config.dtypes import torch_dtype
        from megatron_vita.config.model import ModelConfig
        from megatron_vita.data.template import load_tokenizer
        from megatron_vita.inference.prompt import tokenizer_problems
        from megatron_vita.platform import placement

        problems = hf_dir_problems(model_dir, tokenizer)
        if problems:
            raise ConfigError(problems)
        self.model_dir = model_dir
        self.model_config = ModelConfig.from_hf_dir(model_dir)
        self.tokenizer = load_tokenizer(tokenizer or model_dir)
        problems = tokenizer_problems(self.tokenizer, self.model_config, f"tokenizer {tokenizer or model_dir}")
        if problems:
            raise ConfigError(problems)
        self.device = placement.device(backend)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype)).eval().to(self.device)
        self.stops = stop_token_ids(self.model_config)
        # generate() fills every option a request leaves unset from the model's generation_config
        # (released: sampling at temperature 0.7, repetition penalty 1.05): a neutral one instead,
        # so that only the request decides how tokens are chosen.
        self.model.generation_config = GenerationConfig(
            bos_token_id=self.model_config.tokens.bos_token_id, eos_token_id=list(self.stops),
            pad_token_id=self.model_config.tokens.pad_token_id)
        self._torch = torch
        self._lock = threading.Lock()

    # ---- one request -----------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> Tuple[List[int], "torch.Tensor", int]:  # noqa: F821
        """(prompt ids, pixel values, answer-token budget); raises before any model work."""
        from megatron_vita.inference.prompt import build_prompt, context_limit

        ids, pixels = build_prompt(request, self.tokenizer, self.model_config)
        budget = new_token_budget(request.sampling.max_new_tokens, len(ids), context_limit(request, self.model_config))
        return ids, pixels, budget

    def _generation_config(self, request: GenerationRequest, budget: int):
        from transformers import GenerationConfig

        s = request.sampling
        # Every option set: a None would be filled from the checkpoint's (sampling) generation_config.
        # Greedy gets transformers' neutral values (top_k 50 is its default, unused without sampling,
        # and the one value its validation does not warn about).
        return GenerationConfig(
            do_sample=not s.greedy, temperature=s.temperature if not s.greedy else 1.0,
            top_p=s.top_p if not s.greedy else 1.0, top_k=s.top_k if not s.greedy else 50,
            repetition_penalty=s.repetition_penalty, max_new_tokens=budget, num_beams=1,
            eos_token_id=list(self.stops), pad_token_id=self.model_config.tokens.pad_token_id,
        )

    def _generate_ids(self, request: GenerationRequest, ids: List[int], pixels, budget: int,
                      streamer=None, stopping_criteria=None) -> List[int]:
        torch = self._torch
        if request.sampling.seed is not None and not request.sampling.greedy:
            from megatron_vita import platform

            platform.current().manual_seed(request.sampling.seed)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        images = pixels.to(self.device) if pixels.shape[0] else None
        with torch.no_grad():
            out = self.model.generate(input_ids, images=images, attention_mask=torch.ones_like(input_ids),
                                      generation_config=self._generation_config(request, budget),
                                      streamer=streamer, stopping_criteria=stopping_criteria)
        return out[0, len(ids):].tolist()

    def generate(self, request: GenerationRequest) -> GenerationResult:
        ids, pixels, budget = self.prepare(request)
        with self._lock:
            tokens = self._generate_ids(request, ids, pixels, budget)
        return GenerationResult(detokenize(self.tokenizer, tokens), tokens, finish_reason(tokens, self.stops), len(ids))

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Text pieces as tokens are decoded; the prompt is built (and refused) before the first piece."""
        ids, pixels, budget = self.prepare(request)
        return self._stream(request, ids, pixels, budget)

    def _stream(self, request, ids, pixels, budget) -> Iterator[str]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        torch = self._torch
        cancelled = threading.Event()

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

        streamer = _TokenQueue()
        failure: List[BaseException] = []

        def work():
            try:
                self._generate_ids(request, ids, pixels, budget, streamer, StoppingCriteriaList([_Cancelled()]))
            except BaseException as e:  # re-raised on the caller's thread
                failure.append(e)
            finally:
                streamer.queue.put(_END)

        detok = IncrementalDetokenizer(self.tokenizer)
        with self._lock:
            worker = threading.Thread(target=work, name="hf-generate", daemon=True)
            worker.start()
            try:
                while True:
                    tid = streamer.queue.get()
                    if tid is _END:
                        break
                    piece = detok.push([tid])
                    if piece:
                        yield piece
                if failure:
                    raise failure[0]
                rest = detok.finish()
                if rest:
                    yield rest
                tokens = list(detok.ids)
                # The exhausted stream's value (StopIteration.value): the same result generate() gives.
                return GenerationResult(detokenize(self.tokenizer, tokens), tokens, finish_reason(tokens, self.stops),
                                        len(ids))
            finally:
                cancelled.set()  # a consumer that stopped early ends the generation at the next token
                worker.join()

    def close(self) -> None:
        """Release the model (the generator is unusable afterwards)."""
        self.model = None
