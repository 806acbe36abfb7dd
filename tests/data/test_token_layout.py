"""Token layout against hand-written sequences: 1 tile, a 2x3 grid (thumbnail first), N video frames,
ChatML with pre-shifted labels, and the tile order matching the token-block order in a real batch."""
import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vita.config.model import SPECIAL_TOKENS, TokenIds
from megatron_vita.data.template import (
    IGNORE_INDEX, ChatEncoder, add_long_vita_tokens, image_token_count, image_token_ids, preshift_labels,
    token_ids_from_tokenizer, video_token_count, video_token_ids,
)

TOK = TokenIds.at_end_of_vocab(512)  # <img> 495 </img> 496 <IMG_CONTEXT> 497 <vid> 498 </vid> 499
IMG, IMG_E, IC, VID, VID_E, VC, PAT, PAT_E, PC = range(495, 504)  # <VID_CONTEXT> 500 <patch> 501 ...
NL = 198


def test_special_ids_are_where_the_test_assumes():
    assert [TOK.special[t] for t in SPECIAL_TOKENS[:9]] == [IMG, IMG_E, IC, VID, VID_E, VC, PAT, PAT_E, PC]


def test_image_one_tile():
    assert image_token_ids(1, (1, 1), TOK, 4, [NL]) == [IMG, IC, IC, IC, IC, IMG_E]
    assert image_token_count(1, (1, 1), 4, 1) == 6


def test_image_2x3_grid_thumbnail_first():
    tile = [PAT, PC, PC, PC, PC, PAT_E]
    expected = [IMG, IC, IC, IC, IC, IMG_E,  # the thumbnail
                NL] + tile + tile + tile + [NL] + tile + tile + tile
    got = image_token_ids(7, (2, 3), TOK, 4, [NL])
    assert got == expected
    assert image_token_count(7, (2, 3), 4, 1) == len(expected) == 6 + 2 * 1 + 6 * 6
    # Released size: 256 tokens per tile -> 258 per tile block.
    assert len(image_token_ids(7, (2, 3), TokenIds(), 256, [198])) == 258 * 7 + 2


def test_image_tile_count_must_match_grid():
    with pytest.raises(ValueError, match="thumbnail"):
        image_token_ids(6, (2, 3), TOK, 4, [NL])
    with pytest.raises(ValueError):
        image_token_ids(2, (1, 1), TOK, 4, [NL])


def test_video_frames():
    assert video_token_ids(3, TOK, 2) == [VID, VC, VC, VID_E, VID, VC, VC, VID_E, VID, VC, VC, VID_E]
    assert video_token_count(4096, 256) == 1_056_768  # > 1M: why stage 4 needs an oversize policy
    assert video_token_ids(0, TOK, 4) == []


def test_preshift_labels_by_hand():
    ids = [10, 11, 12, 13, 14]
    sup = [False, False, True, True, False]
    assert preshift_labels(ids, sup) == [IGNORE_INDEX, 12, 13, IGNORE_INDEX, IGNORE_INDEX]
    assert preshift_labels([], []) == []


def test_chatml_labels_only_on_assistant_content_and_end(demo_tok):
    t = token_ids_from_tokenizer(demo_tok)
    enc = ChatEncoder(demo_tok, t, 4)
    msgs = [("user", "<image>\nWhat colour is the shape?"), ("assistant", "red"),
            ("user", "And the shape?"), ("assistant", "circle")]
    content = enc.encode_contents(msgs)
    ids, labels = enc.build(msgs, content, [image_token_ids(1, (1, 1), t, 4, enc.newline_ids)])
    enc_ = lambda s: demo_tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    S, E, nl = t.im_start_token_id, t.eos_token_id, enc_("\n")
    expected = ([S] + enc_("user") + nl + [IMG, IC, IC, IC, IC, IMG_E] + enc_("\nWhat colour is the shape?") + [E] + nl
                + [S] + enc_("assistant") + nl + enc_("red") + [E] + nl
                + [S] + enc_("user") + nl + enc_("And the shape?") + [E] + nl
                + [S] + enc_("assistant") + nl + enc_("circle") + [E] + nl)
    assert ids == expected
    # Targets: each assistant answer, its <|im_end|> and "\n" -- predicted from the position before.
    targets = {i: ids[i + 1] for i in range(len(ids) - 1) if labels[i] != IGNORE_INDEX}
    a1 = len([S] + enc_("user") + nl) + 6 + len(enc_("\nWhat colour is the shape?")) + 1 + len(nl) \
        + len([S] + enc_("assistant") + nl)
    red = enc_("red")
    assert [ids[i] for i in range(a1, a1 + len(red) + 1 + len(nl))] == red + [E] + nl
    assert all(labels[i - 1] == ids[i] for i in range(a1, a1 + len(red) + 1 + len(nl)))
    assert labels[a1 - 2] == IGNORE_INDEX  # the "\n" after "assistant" is not a target
    supervised = sorted(i + 1 for i in targets)
    assert len(supervised) == len(red) + len(enc_("circle")) + 2 * (1 + len(nl))
    assert labels[-1] == IGNORE_INDEX and labels[-2] == nl[-1]
    assert all(x == IGNORE_INDEX or x not in t.context_ids for x in labels)


def test_token_ids_and_adding_tokens_in_documented_order(demo_tok):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert token_ids_from_tokenizer(demo_tok) == TOK  # the demo tokenizer matches the tiny preset
    base = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    base.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=base, unk_token="[UNK]")
    with pytest.raises(ValueError, match="lacks tokens"):
        token_ids_from_tokenizer(tok)
    add_long_vita_tokens(tok)
    ids = token_ids_from_tokenizer(tok)
    assert (ids.bos_token_id, ids.im_start_token_id, ids.eos_token_id) == (2, 3, 4)
    assert [ids.special[s] for s in SPECIAL_TOKENS] == list(range(5, 22))


def test_tile_order_equals_token_block_order_in_a_batch(tmp_path, demo_tok, tiny_cfg):
    """Two images in one document: a 1x2 grid (thumbnail + 2 tiles) then a single tile; every
    tile's pixels sit at the index of its token block in image_indices."""
    from megatron_vita.data.image import load_image_pictures, tiles_to_uint8
    from megatron_vita.data.packing import collate_packs

    t = token_ids_from_tokenizer(demo_tok)
    enc = ChatEncoder(demo_tok, t, 4)
    wide = np.zeros((56, 112, 3), np.uint8)
    wide[:, :56] = (255, 0, 0)
    wide[:, 56:] = (0, 0, 255)
    single = np.full((56, 56, 3), (0, 255, 0), np.uint8)
    pics_a, grid_a = load_image_pictures(Image.fromarray(wide), 56, max_num=2)
    pics_b, grid_b = load_image_pictures(Image.fromarray(single), 56, max_num=2)
    assert grid_a == (1, 2) and grid_b == (1, 1) and len(pics_a) == 3
    msgs = [("user", "<image> and <image>"), ("assistant", "ok")]
    ids, labels = enc.build(msgs, enc.encode_contents(msgs),
                            [image_token_ids(3, grid_a, t, 4, enc.newline_ids), image_token_ids(1, grid_b, t, 4, enc.newline_ids)])
    pix = tiles_to_uint8(pics_a + pics_b, 56)
    batch = collate_packs([[(ids, labels, pix)]], 96, t.pad_token_id, True, 4, t.context_ids, 56, True)
    ii = batch["image_indices"]
    assert ii.shape == (2, 4, 4)
    tok_at = batch["tokens"][0][ii[1]]
    assert tok_at[0].tolist() == [IC] * 4 and all(row.tolist() == [PC] * 4 for row in tok_at[1:3])
    assert tok_at[3].tolist() == [IC] * 4
    assert (ii[1].flatten().diff() > 0).all()  # strictly increasing: row-major token order
    red, blue = batch["pixel_values"][1].mean((1, 2)), batch["pixel_values"][2].mean((1, 2))
    assert red[0] > 2 and red[2] < -1 and blue[2] > 2 and blue[0] < -1  # left tile red, right tile blue
    assert batch["pixel_values"][3].mean((1, 2))[1] > 2  # the green single tile comes last
    thumb = batch["pixel_values"][0].mean((1, 2))
    assert thumb[0] > 0 and thumb[2] > 0  # the thumbnail shows both halves
    assert torch.equal(batch["loss_mask"], (batch["labels"] != IGNORE_INDEX).float())


def test_prompt_matches_the_training_layout(demo_dir, demo_tok, tiny_cfg, cache_dir):
    """The held-out prompt is the training document up to the answer, plus the assistant header."""
    import json
    import os

    from megatron_vita.data.loader import RecordEvaluator
    from megatron_vita.data.readers import normalize_record
    from megatron_vita.data.recipe import load_recipe

    recipe = load_recipe(os.path.join(os.path.dirname(__file__), "..", "..", "data_recipes", "demo.yaml"), demo_dir)
    ev = RecordEvaluator(recipe, demo_tok, tiny_cfg, demo_dir, cache_dir)
    with open(os.path.join(demo_dir, "heldout", "heldout.jsonl")) as f:
        record = json.loads(f.readline())
    ids, pixels, answer = ev.prompt(record)
    assert answer == record["answer"] and pixels.shape == (1, 3, 56, 56) and pixels.dtype == torch.float32
    full, _ = ev.builder.fit(normalize_record(record), demo_dir)
    answer_ids = demo_tok(answer, add_special_tokens=False)["input_ids"]
    assert full.input_ids[:len(ids)] == ids and full.input_ids[len(ids):len(ids) + len(answer_ids)] == answer_ids
    assert demo_tok.decode(ids[-3:]) == "<|im_start|>assistant\n"
