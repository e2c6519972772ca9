"""Tokenizers: the `Tokenizer` contract and a word-level tokenizer for the embedded dataset.

Every tokenizer lays out a text of `n` tokens in `L = max_len` slots as
`[CLS] w1 ... wn [EOS] [PAD] ...`, with `[PAD] = 0`. Texts longer than `L - 2` tokens are cut so
that `[CLS]` stays first and `[EOS]` last. The mask is 1 on `[CLS]`, the words and `[EOS]`, 0 on
padding. A BERT WordPiece or SentencePiece tokenizer can be added later behind the same Protocol.
"""

import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vlalign.data import shapes
from vlalign.errors import ConfigError

PAD, UNK, CLS, EOS, MASK = "[PAD]", "[UNK]", "[CLS]", "[EOS]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, EOS, MASK)

# A word is a run of letters/digits; every other non-space character is a token of its own.
_WORD_RE = re.compile(r"[^\W_]+|[^\w\s]|_")


@runtime_checkable
class Tokenizer(Protocol):
  """What the pipeline, the model config and the evaluators rely on."""

  vocab_size: int
  pad_id: int
  cls_id: int
  eos_id: int
  mask_id: int
  unk_id: int

  def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [L] int32, mask [L] int32)` with `L = max_len`."""
    ...

  def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [N, L] int32, mask [N, L] int32)` for `N = len(texts)`."""
    ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The words of `ids` joined by spaces, without `[PAD]`, `[CLS]` and `[EOS]`."""
    ...


def split_words(text: str) -> list[str]:
  """Lower-cased words and punctuation marks: `"A red, circle!"` -> `[a, red, ",", circle, "!"]`."""
  return _WORD_RE.findall(text.lower())


def layout(token_ids: Sequence[int], max_len: int, cls_id: int, eos_id: int, pad_id: int):
  """`(ids [L] int32, mask [L] int32)`: `[CLS] t1 .. tk [EOS] [PAD]..` with `k <= L - 2`."""
  if max_len < 2:
    raise ConfigError(f"max_len={max_len} leaves no room for [CLS] and [EOS]; use max_len >= 2")
  body = list(token_ids[: max_len - 2])
  used = len(body) + 2
  ids = np.full((max_len,), pad_id, dtype=np.int32)
  ids[:used] = [cls_id, *body, eos_id]
  mask = np.zeros((max_len,), dtype=np.int32)
  mask[:used] = 1
  return ids, mask


class WordTokenizer:
  """Whole-word tokenizer over a fixed vocabulary; unknown words become `[UNK]`.

  Ids: `[PAD]=0, [UNK]=1, [CLS]=2, [EOS]=3, [MASK]=4`, then `vocab` in the given order.

  Args:
    vocab: the words (duplicates and special tokens in it are ignored).
  """

  def __init__(self, vocab: Sequence[str]):
    tokens = list(SPECIAL_TOKENS)
    for word in vocab:
      if word not in tokens:
        tokens.append(word)
    self.tokens: tuple[str, ...] = tuple(tokens)
    self._ids = {token: i for i, token in enumerate(tokens)}
    self.vocab_size = len(tokens)
    self.pad_id = self._ids[PAD]
    self.unk_id = self._ids[UNK]
    self.cls_id = self._ids[CLS]
    self.eos_id = self._ids[EOS]
    self.mask_id = self._ids[MASK]
    self._skip_on_decode = {self.pad_id, self.cls_id, self.eos_id}

  def token_ids(self, text: str) -> list[int]:
    """Ids of the words of `text`, without special tokens."""
    return [self._ids.get(word, self.unk_id) for word in split_words(text)]

  def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [L] int32, mask [L] int32)`, `L = max_len` (see the module docstring)."""
    return layout(self.token_ids(text), max_len, self.cls_id, self.eos_id, self.pad_id)

  def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [N, L] int32, mask [N, L] int32)`."""
    ids = np.zeros((len(texts), max_len), dtype=np.int32)
    mask = np.zeros((len(texts), max_len), dtype=np.int32)
    for row, text in enumerate(texts):
      ids[row], mask[row] = self.encode(text, max_len)
    return ids, mask

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The tokens of `ids` joined by spaces, skipping `[PAD]`, `[CLS]` and `[EOS]`."""
    return " ".join(
      self.tokens[i] for i in np.asarray(ids).tolist() if i not in self._skip_on_decode
    )


TOKENIZERS = ("shapes_words",)


def build_tokenizer(data_config: Any) -> Tokenizer:
  """The tokenizer named by `data_config.tokenizer` (default "shapes_words")."""
  name = data_config.get("tokenizer", "shapes_words")
  if name == "shapes_words":
    return WordTokenizer(shapes.vocabulary())
  raise ConfigError(f"unknown tokenizer {name!r}; available: {list(TOKENIZERS)}")
