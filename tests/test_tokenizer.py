"""Tests of the word tokenizer: layout, truncation, unknown words, and coverage of the dataset."""

import itertools

import ml_collections
import numpy as np
import pytest

from vlalign.data import shapes
from vlalign.data import tokenizer as tk

CONFIG = ml_collections.ConfigDict(dict(tokenizer="shapes_words"))


def _reference_encode(tok: tk.WordTokenizer, words: list[str], max_len: int):
  """Plain-loop reference of the `[CLS] w.. [EOS] [PAD]..` layout."""
  index = {t: i for i, t in enumerate(tok.tokens)}
  body = [index.get(w, tok.unk_id) for w in words][: max_len - 2]
  ids = [tok.cls_id, *body, tok.eos_id]
  mask = [1] * len(ids)
  while len(ids) < max_len:
    ids.append(tok.pad_id)
    mask.append(0)
  return ids, mask


def test_special_tokens_come_first():
  tok = tk.WordTokenizer(["red", "circle", "red", "[PAD]"])
  assert tok.tokens[:5] == ("[PAD]", "[UNK]", "[CLS]", "[EOS]", "[MASK]")
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.tokens[5:] == ("red", "circle") and tok.vocab_size == 7
  assert isinstance(tok, tk.Tokenizer)


def test_padding_layout_matches_reference():
  tok = tk.build_tokenizer(CONFIG)
  text = "a large red circle to the left of a small blue square"
  ids, mask = tok.encode(text, 16)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape == (16,)
  ref_ids, ref_mask = _reference_encode(tok, text.split(), 16)
  assert ids.tolist() == ref_ids and mask.tolist() == ref_mask
  assert ids[0] == tok.cls_id and ids[13] == tok.eos_id and (ids[14:] == tok.pad_id).all()
  assert mask.sum() == 14  # CLS + 12 words + EOS.


def test_truncation_keeps_cls_first_and_eos_last():
  tok = tk.build_tokenizer(CONFIG)
  ids, mask = tok.encode("a large red circle above a blue star", 5)
  assert ids.tolist() == [tok.cls_id, *tok.token_ids("a large red"), tok.eos_id]
  assert mask.tolist() == [1] * 5
  ids, mask = tok.encode("", 4)
  assert ids.tolist() == [tok.cls_id, tok.eos_id, 0, 0] and mask.tolist() == [1, 1, 0, 0]
  with pytest.raises(ValueError, match="max_len"):
    tok.encode("red", 1)


def test_lowercase_punctuation_and_unknown_words():
  tok = tk.build_tokenizer(CONFIG)
  assert tk.split_words("A RED, Circle!") == ["a", "red", ",", "circle", "!"]
  ids, _ = tok.encode("A RED, Circle! zebra", 10)
  words = ["a", "red", ",", "circle", "!", "zebra"]
  assert ids.tolist() == _reference_encode(tok, words, 10)[0]
  assert ids.tolist().count(tok.unk_id) == 2  # '!' and 'zebra'
  assert tok.decode(ids) == "a red , circle [UNK] [UNK]"


def test_round_trip_and_no_unknown_words_on_dataset_captions():
  tok = tk.build_tokenizer(CONFIG)
  source = shapes.ShapesSource("train", image_size=32)
  captions = [c for i in range(60) for c in source[i]["captions"]]
  for task in shapes.ZEROSHOT_TASKS.values():
    captions += [t.format(n) for t, n in itertools.product(task.templates, task.class_names)]
  ids, mask = tok.encode_batch(captions, 40)
  assert ids.shape == mask.shape == (len(captions), 40)
  assert not (ids == tok.unk_id).any()
  assert (mask.sum(axis=1) < 40).all()  # Nothing was cut at this length.
  for row, caption in enumerate(captions):
    one_ids, one_mask = tok.encode(caption, 40)
    np.testing.assert_array_equal(ids[row], one_ids)
    np.testing.assert_array_equal(mask[row], one_mask)
    assert tok.decode(ids[row]) == caption


def test_shapes_tokenizer_fits_the_config_vocabulary():
  tok = tk.build_tokenizer(CONFIG)
  assert tok.vocab_size == 5 + len(shapes.vocabulary())
  assert tok.vocab_size <= 128  # configs.common.SHAPES_VOCAB_SIZE


def test_unknown_tokenizer_name_is_a_clear_error():
  with pytest.raises(ValueError, match="'bert_base'"):
    tk.build_tokenizer(ml_collections.ConfigDict(dict(tokenizer="bert_base")))


@pytest.mark.parametrize(
  ("caption", "want"),
  [
    ("A man's dog, running (fast)!", "a mans dog running fast"),
    ("Two  people -- on a half-pipe/ramp.", "two people on a half pipe ramp"),
    ("<person> rides a bike; #1 ~ok~\n", "person rides a bike 1 ok"),
    (" ".join(f"w{i}" for i in range(40)), " ".join(f"w{i}" for i in range(30))),
  ],
)
def test_albef_pre_caption_cleans_as_the_official_code(caption, want):
  assert tk.albef_pre_caption(caption, 30) == want


def test_caption_preprocess_cleans_before_tokenizing():
  plain = tk.build_tokenizer({"tokenizer": "shapes_words"})
  cleaned = tk.build_tokenizer({"tokenizer": "shapes_words", "caption_preprocess": "albef"})
  text = "A RED circle, LEFT of a blue square."
  ids, mask = cleaned.encode(text, 16)
  want_ids, want_mask = plain.encode("a red circle left of a blue square", 16)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)
  batch_ids, _ = cleaned.encode_batch([text, text], 16)
  np.testing.assert_array_equal(batch_ids[1], want_ids)
  assert cleaned.mask_id == plain.mask_id and cleaned.vocab_size == plain.vocab_size
  with pytest.raises(ValueError, match="caption_preprocess"):
    tk.build_tokenizer({"tokenizer": "shapes_words", "caption_preprocess": "lower"})
