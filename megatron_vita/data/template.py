"""Token layout of Long-VITA samples: media expansion, ChatML, pre-shifted labels, tokenizer ids.

Owns how a conversation becomes token ids and labels:

- `<image>` -> `<img>` + T x `<IMG_CONTEXT>` + `</img>` (thumbnail, or the single tile); when the
  grid has more than one tile, then per tile row "\n" and per tile `<patch>` + T x
  `<PATCH_CONTEXT>` + `</patch>`. `<video>` -> per frame `<vid>` + T x `<VID_CONTEXT>` + `</vid>`.
  T is ModelConfig.num_image_token (256 for the released model). These are pure functions over
  ids, so the model side can rebuild prompts without a tokenizer.
- ChatML `<|im_start|>{role}\n{content}<|im_end|>\n` with no default system message; only the
  assistant content plus `<|im_end|>` and "\n" are supervised.
- Labels are PRE-SHIFTED per document: labels[t] is the target of position t (the token at t+1
  when that token is supervised, else -100). The last position of a document never has a
  target, so packed documents never predict across a boundary. This also removes the
  original's shift-after-selection bug in the logits-masked head.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from megatron_vita.config.model import SPECIAL_TOKENS, TokenIds

IGNORE_INDEX = -100
# ChatML tokens, in the order the demo tokenizer adds them before the 17 Long-VITA tokens.
CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


class SampleError(ValueError):
    """A record that cannot become a training sample; `reason` is its bad-sample counter."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def image_token_ids(num_tiles: int, grid: Tuple[int, int], tokens: TokenIds, num_image_token: int,
                    newline_ids: List[int]) -> List[int]:
    """Ids replacing one `<image>`: thumbnail/single-tile block, then the grid rows.

    `num_tiles` counts the thumbnail: 1 for a 1x1 grid, rows*cols + 1 otherwise.
    """
    rows, cols = grid
    n_grid = rows * cols
    if rows < 1 or cols < 1 or num_tiles != (1 if n_grid == 1 else n_grid + 1):
        raise ValueError(f"an image with grid {rows}x{cols} has {1 if n_grid == 1 else n_grid + 1} tiles "
                         f"(thumbnail first when the grid has more than one), got num_tiles={num_tiles}")
    sp = tokens.special
    ids = [sp["<img>"]] + [sp["<IMG_CONTEXT>"]] * num_image_token + [sp["</img>"]]
    if n_grid > 1:
        tile = [sp["<patch>"]] + [sp["<PATCH_CONTEXT>"]] * num_image_token + [sp["</patch>"]]
        for _ in range(rows):
            ids += list(newline_ids)
            for _ in range(cols):
                ids += tile
    return ids


def video_token_ids(num_frames: int, tokens: TokenIds, num_image_token: int) -> List[int]:
    """Ids replacing one `<video>`: `<vid>` + T x `<VID_CONTEXT>` + `</vid>` per frame."""
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    sp = tokens.special
    return ([sp["<vid>"]] + [sp["<VID_CONTEXT>"]] * num_image_token + [sp["</vid>"]]) * num_frames


def image_token_count(num_tiles: int, grid: Tuple[int, int], num_image_token: int, newline_len: int) -> int:
    """len(image_token_ids(...)) without building the list."""
    rows, cols = grid
    n = num_image_token + 2
    return n if rows * cols == 1 else n + rows * newline_len + rows * cols * n


def video_token_count(num_frames: int, num_image_token: int) -> int:
    return num_frames * (num_image_token + 2)


def preshift_labels(input_ids: Sequence[int], supervised: Sequence[bool]) -> List[int]:
    """labels[t] = input_ids[t+1] where position t+1 is supervised, else -100; last is -100."""
    n = len(input_ids)
    return [input_ids[t + 1] if supervised[t + 1] else IGNORE_INDEX for t in range(n - 1)] + ([IGNORE_INDEX] if n else [])


# ---- tokenizer helpers --------------------------------------------------------------------
def _token_id(tok, token: str) -> Optional[int]:
    tid = tok.convert_tokens_to_ids(token)
    if tid is None or (tok.unk_token_id is not None and tid == tok.unk_token_id and token != tok.unk_token):
        return None
    return int(tid)


def token_ids_from_tokenizer(tok) -> TokenIds:
    """TokenIds matching a tokenizer (ChatML tokens + the 17 Long-VITA tokens must be present)."""
    missing = [t for t in CHATML_TOKENS + SPECIAL_TOKENS if _token_id(tok, t) is None]
    if missing:
        raise ValueError(f"tokenizer {getattr(tok, 'name_or_path', '')!r} lacks tokens {missing}; "
                         "add them with add_long_vita_tokens(tok) (the 17 specials in the documented order)")
    endoftext = _token_id(tok, "<|endoftext|>")
    pad = tok.pad_token_id if tok.pad_token_id is not None else endoftext
    return TokenIds(
        bos_token_id=endoftext, eos_token_id=_token_id(tok, "<|im_end|>"), pad_token_id=int(pad),
        im_start_token_id=_token_id(tok, "<|im_start|>"),
        special={t: _token_id(tok, t) for t in SPECIAL_TOKENS},
    )


def add_long_vita_tokens(tok):
    """Add whichever ChatML and Long-VITA special tokens are missing, in the documented order.

    On the Qwen2.5 tokenizer this gives the 17 tokens ids 151665..151681. Returns the tokenizer.
    """
    missing = [t for t in CHATML_TOKENS + SPECIAL_TOKENS if _token_id(tok, t) is None]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    return tok


def load_tokenizer(path: str):
    """An HF tokenizer directory with the Long-VITA tokens (added if missing). No remote code."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {path!r}: {e}") from None
    return add_long_vita_tokens(tok)


class ChatEncoder:
    """Encodes conversations with a Hugging Face tokenizer into (input_ids, pre-shifted labels)."""

    def __init__(self, tokenizer, tokens: TokenIds, num_image_token: int):
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.num_image_token = num_image_token
        self.newline_ids = self._encode(["\n"])[0]
        self.role_ids: Dict[str, List[int]] = dict(zip(("user", "assistant", "system"),
                                                       self._encode(["user", "assistant", "system"])))
        self.image_tag = tokens.special["<image>"]
        self.video_tag = tokens.special["<video>"]
        self.reserved = set(tokens.context_ids)

    def _encode(self, texts: List[str]) -> List[List[int]]:
        if not texts:
            return []
        # The Rust tokenizer's encode only borrows it, so planner threads can share it; the HF
        # wrapper's __call__ may reconfigure truncation/padding on every call, which is not thread safe.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        return [list(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def media_tag_order(self, content_ids: Sequence[Sequence[int]]) -> List[str]:
        """'image'/'video' for each media tag, in sequence order."""
        out = []
        for ids in content_ids:
            out += ["image" if t == self.image_tag else "video" for t in ids if t in (self.image_tag, self.video_tag)]
        return out

    def encode_contents(self, messages: Sequence[Tuple[str, str]]) -> List[List[int]]:
        """Tokenised message contents (media tags are single special-token ids in them)."""
        content_ids = self._encode([c for _, c in messages])
        for ids in content_ids:
            if self.reserved.intersection(ids):
                raise SampleError("message text contains a feature placeholder token "
                                  "(<IMG_CONTEXT>/<VID_CONTEXT>/<PATCH_CONTEXT>)", "reserved_token_in_text")
        return content_ids

    def build(self, messages: Sequence[Tuple[str, str]], content_ids: Sequence[Sequence[int]],
              media_ids: Sequence[List[int]]) -> Tuple[List[int], List[int]]:
        """ChatML ids with each media tag replaced by `media_ids[k]` (k-th tag in order), and labels."""
        t = self.tokens
        ids: List[int] = []
        sup: List[bool] = []
        k = 0
        for (role, _), content in zip(messages, content_ids):
            head = [t.im_start_token_id] + self.role_ids[role] + self.newline_ids
            ids += head
            sup += [False] * len(head)
            is_assistant = role == "assistant"
            for tid in content:
                if tid == self.image_tag or tid == self.video_tag:
                    block = media_ids[k]
                    k += 1
                    ids += block
                    sup += [False] * len(block)
                else:
                    ids.append(tid)
                    sup.append(is_assistant)
            tail = [t.eos_token_id] + self.newline_ids
            ids += tail
            sup += [is_assistant] * len(tail)
        if k != len(media_ids):
            raise SampleError(f"{len(media_ids)} media given but {k} tags in the text", "placeholder_mismatch")
        return ids, preshift_labels(ids, sup)
