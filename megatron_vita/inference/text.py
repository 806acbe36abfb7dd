"""From generated token ids to answer text, the same way on every generation path.

Owns the three things the HF generator, the megatron-core engine and the server must agree on
so that their answers are the same strings:

- `stop_token_ids`: generation ends at `<|im_end|>` (the ChatML end of the assistant turn) or
  `<|endoftext|>` (the released generation_config's eos list [151645, 151643]);
- `new_token_budget`: answer tokens allowed, `max_new_tokens` capped so that prompt + answer
  stay within `max_seq_len` (default: the model's position limit);
- `IncrementalDetokenizer`: text pieces as ids arrive. A piece is released only once it is
  final: a byte-level BPE token can end inside a multi-byte UTF-8 character (decoded as U+FFFD
  until the rest arrives), so text is held back while it ends with U+FFFD, and each step
  decodes only a short window (the last released chunk + the new ids) instead of the whole
  answer. `GenerationResult.text` is made by the same object fed the same ids, so the joined
  stream equals the non-streamed text exactly; for byte-level BPE both equal
  `tokenizer.decode(ids, skip_special_tokens=True)`.

`GenerationResult.token_ids` holds the generated ids INCLUDING the stop token when the answer
ended with one (finish_reason "stop"), as transformers' generate returns them.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence

_REPLACEMENT = "\ufffd"


def stop_token_ids(model_config) -> List[int]:
    """[<|im_end|>, <|endoftext|>] of the model's token ids."""
    t = model_config.tokens
    return list(dict.fromkeys([t.eos_token_id, t.bos_token_id]))


def new_token_budget(max_new_tokens: int, prompt_tokens: int, limit: int) -> int:
    """Answer tokens allowed: `max_new_tokens`, fewer if prompt + answer would pass `limit`."""
    return max(0, min(max_new_tokens, limit - prompt_tokens))


def finish_reason(token_ids: Sequence[int], stops: Iterable[int]) -> str:
    return "stop" if token_ids and token_ids[-1] in set(stops) else "length"


class IncrementalDetokenizer:
    """Text pieces of a growing list of generated ids (special tokens are not text)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self._prefix = 0  # start of the window decoded each step (the last released chunk)
        self._read = 0  # ids up to here are released as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _release(self, final: bool) -> str:
        # Decoding the previous chunk with the new ids keeps context-dependent decoders (leading
        # spaces of SentencePiece) right; only what the new ids add is released.
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith(_REPLACEMENT)):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def push(self, ids: Iterable[int]) -> str:
        """Add generated ids; the text they complete ('' while a character is still partial)."""
        self.ids.extend(int(i) for i in ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back (a character left partial by the last id)."""
        return self._release(final=True)


def detokenize(tokenizer, ids: Sequence[int]) -> str:
    """The text an `IncrementalDetokenizer` streams for `ids`, one id at a time, joined."""
    d = IncrementalDetokenizer(tokenizer)
    return "".join([d.push([i]) for i in ids] + [d.finish()])
