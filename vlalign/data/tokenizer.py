"""Tokenizers: the `Tokenizer` contract and a word-level tokenizer for the embedded dataset.

Every tokenizer lays out a text of `n` tokens in `L = max_len` slots as
`[CLS] w1 ... wn [EOS] [PAD] ...`, with `[PAD] = 0`. Texts longer than `L - 2` tokens are cut so
that `[CLS]` stays first and `[EOS]` last. The mask is 1 on `[CLS]`, the words and `[EOS]`, 0 on
padding. A tokenizer without a begin token (`cls_id is None`: SigLIP's SentencePiece model) lays
out `w1 ... wn [EOS] [PAD] ...` instead. `data.tokenizer` picks one: `shapes_words` (the embedded
dataset's words), `tokenizer_json` (a Hugging Face `tokenizer.json` at `data.tokenizer_path`: BERT
WordPiece, CLIP BPE, ...) or `sentencepiece` (a SentencePiece `.model` at `data.tokenizer_path`:
Llama, SigLIP, T5), whose special ids come from the tokenizer, never from constants here.
"""

import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vlalign.data import shapes
from vlalign.errors import ConfigError, PathError

PAD, UNK, CLS, EOS, MASK = "[PAD]", "[UNK]", "[CLS]", "[EOS]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, EOS, MASK)

# A word is a run of letters/digits; every other non-space character is a token of its own.
_WORD_RE = re.compile(r"[^\W_]+|[^\w\s]|_")


@runtime_checkable
class Tokenizer(Protocol):
  """What the pipeline, the model config and the evaluators rely on."""

  vocab_size: int
  pad_id: int
  cls_id: int | None
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


def layout(
  token_ids: Sequence[int], max_len: int, cls_id: int | None, eos_id: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
  """`(ids [L] int32, mask [L] int32)`: `[CLS] t1 .. tk [EOS] [PAD]..` with `k <= L - 2`
  (without `cls_id`: `t1 .. tk [EOS] [PAD]..`, `k <= L - 1`)."""
  begin = [] if cls_id is None else [cls_id]
  if max_len < len(begin) + 1:
    raise ConfigError(f"max_len={max_len} leaves no room for the special tokens; use max_len >= 2")
  body = list(token_ids[: max_len - len(begin) - 1])
  used = len(body) + len(begin) + 1
  ids = np.full((max_len,), pad_id, dtype=np.int32)
  ids[:used] = [*begin, *body, eos_id]
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


# Names of each special token in the common tokenizer families, in order of preference, for a
# `tokenizer.json` without a `special_tokens_map.json` / `tokenizer_config.json` beside it.
_SPECIAL_CANDIDATES = {
  "cls": ("[CLS]", "<s>", "<|startoftext|>", "<bos>"),
  "eos": ("[SEP]", "</s>", "<|endoftext|>", "<eos>"),
  "pad": ("[PAD]", "<pad>"),
  "mask": ("[MASK]", "<mask>"),
  "unk": ("[UNK]", "<unk>", "<|endoftext|>"),
}
# Fields of Hugging Face's special-token maps for each role, in order of preference.
_SPECIAL_FIELDS = {
  "cls": ("cls_token", "bos_token"),
  "eos": ("sep_token", "eos_token"),
  "pad": ("pad_token",),
  "mask": ("mask_token",),
  "unk": ("unk_token",),
}


def _special_tokens_map(directory: Any) -> dict[str, str]:
  """Role fields (`cls_token`, ...) -> token text, from the files beside tokenizer.json."""
  import json  # noqa: PLC0415

  found: dict[str, str] = {}
  for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the latter wins
    path = directory / name
    if path.exists():
      for key, value in json.loads(path.read_text()).items():
        value = value.get("content") if isinstance(value, dict) else value
        if key.endswith("_token") and isinstance(value, str):
          found[key] = value
  return found


class JsonTokenizer:
  """A Hugging Face `tokenizers` tokenizer (`tokenizer.json`) behind the `Tokenizer` contract.

  The text is split by the tokenizer's own normalizer, pre-tokenizer and model (lower-casing,
  accent stripping and WordPiece for BERT; byte-level BPE for CLIP); the layout is this module's
  (`[CLS] t1 .. tk [SEP] [PAD]..` with `k <= L - 2`, which is what BERT's tokenizer gives with
  `truncation=True, padding="max_length"`). Special ids come from `special_tokens_map.json` /
  `tokenizer_config.json` beside the file, else from the token names the common families use.
  Without a pad token, `[PAD]` is id 0 (as open_clip pads); without a mask token, `mask_id` is -1
  and a method that masks tokens refuses the tokenizer.

  Args:
    path: `tokenizer.json`, or the directory holding it (an `epath.Path` or string).
  """

  def __init__(self, path: Any):
    from tokenizers import Tokenizer as HFTokenizer  # noqa: PLC0415

    from vlalign import workdir as workdir_lib  # noqa: PLC0415

    path = workdir_lib.as_path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
      raise PathError(f"data.tokenizer_path: no tokenizer.json at {path}")
    self.path = file
    self._tok = HFTokenizer.from_str(file.read_text())
    self._tok.no_truncation()
    self._tok.no_padding()
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    named = _special_tokens_map(file.parent)
    ids = {}
    for role, fields in _SPECIAL_FIELDS.items():
      names = [named[f] for f in fields if f in named] + list(_SPECIAL_CANDIDATES[role])
      ids[role] = next((vocab[n] for n in names if n in vocab), None)
    for role in ("cls", "eos"):
      if ids[role] is None:
        raise ConfigError(f"{file}: no {role} token found (looked for {_SPECIAL_CANDIDATES[role]})")
    self.cls_id, self.eos_id = ids["cls"], ids["eos"]
    self.pad_id = 0 if ids["pad"] is None else ids["pad"]
    self.mask_id = -1 if ids["mask"] is None else ids["mask"]
    self.unk_id = self.eos_id if ids["unk"] is None else ids["unk"]

  def token_ids(self, text: str) -> list[int]:
    """Ids of the tokens of `text`, without special tokens."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [L] int32, mask [L] int32)`, `L = max_len` (see the module docstring)."""
    return layout(self.token_ids(text), max_len, self.cls_id, self.eos_id, self.pad_id)

  def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [N, L] int32, mask [N, L] int32)`, tokenized in one call to the Rust tokenizer."""
    ids = np.zeros((len(texts), max_len), dtype=np.int32)
    mask = np.zeros((len(texts), max_len), dtype=np.int32)
    encoded = self._tok.encode_batch(list(texts), add_special_tokens=False)
    for row, enc in enumerate(encoded):
      ids[row], mask[row] = layout(enc.ids, max_len, self.cls_id, self.eos_id, self.pad_id)
    return ids, mask

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of `ids` without special tokens (the tokenizer's own decoder)."""
    return self._tok.decode(np.asarray(ids).tolist(), skip_special_tokens=True)


class SentencePieceTokenizer:
  """A SentencePiece model (`.model`: Llama, SigLIP, T5) behind the `Tokenizer` contract.

  Special ids come from the model: `[CLS]` is its begin-of-sentence piece (None when it has none,
  as SigLIP's: the layout then starts with the first word), `[EOS]` its end-of-sentence piece,
  `[PAD]` its pad piece or, without one (Llama), the end piece; `mask_id` is the id of a `<mask>` /
  `[MASK]` piece, or -1. Text normalisation is the model's own (no extra lower-casing or
  punctuation removal: SigLIP's Hugging Face tokenizer also canonicalises the text first).

  Args:
    path: the `.model` file, or a directory holding `tokenizer.model` or `spiece.model`.
  """

  MODEL_FILES = ("tokenizer.model", "spiece.model")

  def __init__(self, path: Any):
    import sentencepiece  # noqa: PLC0415

    from vlalign import workdir as workdir_lib  # noqa: PLC0415

    path = workdir_lib.as_path(path)
    files = [path / n for n in self.MODEL_FILES] if path.is_dir() else [path]
    file = next((f for f in files if f.exists()), None)
    if file is None:
      raise PathError(f"data.tokenizer_path: no SentencePiece model ({self.MODEL_FILES}) at {path}")
    self.path = file
    self._sp = sentencepiece.SentencePieceProcessor(model_proto=file.read_bytes())
    self.vocab_size = self._sp.get_piece_size()
    if self._sp.eos_id() < 0:
      raise ConfigError(f"{file}: the SentencePiece model has no end-of-sentence piece")
    self.cls_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eos_id = self._sp.eos_id()
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
    self.unk_id = self._sp.unk_id()
    self.mask_id = next(
      (self._sp.piece_to_id(p) for p in ("<mask>", "[MASK]") if self._is_piece(p)), -1
    )

  def _is_piece(self, piece: str) -> bool:
    index = self._sp.piece_to_id(piece)
    return index != self.unk_id and self._sp.id_to_piece(index) == piece

  def token_ids(self, text: str) -> list[int]:
    """Ids of the pieces of `text`, without special tokens."""
    return self._sp.encode(text, out_type=int)

  def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [L] int32, mask [L] int32)`, `L = max_len` (see the module docstring)."""
    return layout(self.token_ids(text), max_len, self.cls_id, self.eos_id, self.pad_id)

  def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [N, L] int32, mask [N, L] int32)`."""
    ids = np.zeros((len(texts), max_len), dtype=np.int32)
    mask = np.zeros((len(texts), max_len), dtype=np.int32)
    for row, pieces in enumerate(self._sp.encode(list(texts), out_type=int)):
      ids[row], mask[row] = layout(pieces, max_len, self.cls_id, self.eos_id, self.pad_id)
    return ids, mask

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of `ids` without special tokens."""
    special = {self.cls_id, self.eos_id, self.pad_id}
    return self._sp.decode([i for i in np.asarray(ids).tolist() if i not in special])


class PromptTokenizer:
  """A tokenizer that writes every text into a prompt template (`data.text_template`), e.g. an
  in-context prompt whose last token is where a causal language model predicts a word (LexVLA).

  The template holds `{}` once; the prefix and suffix around it are tokenized on their own (by
  the base tokenizer's `token_ids`) and kept whole: when a text is too long, the text is cut, never
  the prompt. Everything else (special ids, `decode`) is the base tokenizer's.

  Args:
    base: a tokenizer with `token_ids(text) -> list[int]` (all of this module's do).
    template: e.g. `'The focus of "{}" lies on important words:'`.
  """

  def __init__(self, base: Tokenizer, template: str):
    if template.count("{}") != 1:
      raise ConfigError(f"data.text_template must contain '{{}}' exactly once; got {template!r}")
    prefix, suffix = template.split("{}")
    self.base = base
    self.template = template
    self.prefix_ids = base.token_ids(prefix) if prefix.strip() else []
    self.suffix_ids = base.token_ids(suffix) if suffix.strip() else []
    for name in ("vocab_size", "pad_id", "cls_id", "eos_id", "mask_id", "unk_id"):
      setattr(self, name, getattr(base, name))

  def token_ids(self, text: str) -> list[int]:
    """Ids of the prompted text, without special tokens."""
    return [*self.prefix_ids, *self.base.token_ids(text), *self.suffix_ids]

  def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [L] int32, mask [L] int32)`: the prompt around `text`, cut inside `text` if needed."""
    room = max_len - (self.cls_id is not None) - 1 - len(self.prefix_ids) - len(self.suffix_ids)
    if room < 1:
      raise ConfigError(
        f"data.max_len={max_len} leaves no room for a text in data.text_template "
        f"({len(self.prefix_ids) + len(self.suffix_ids)} prompt tokens); raise data.max_len"
      )
    body = [*self.prefix_ids, *self.base.token_ids(text)[:room], *self.suffix_ids]
    return layout(body, max_len, self.cls_id, self.eos_id, self.pad_id)

  def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [N, L] int32, mask [N, L] int32)`."""
    rows = [self.encode(text, max_len) for text in texts]
    if not rows:
      return np.zeros((0, max_len), np.int32), np.zeros((0, max_len), np.int32)
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self.base.decode(ids)


_ALBEF_PUNCTUATION = re.compile(r"([,.'!?\"()*#:;~])")
_RUNS_OF_SPACES = re.compile(r"\s{2,}")


def albef_pre_caption(caption: str, max_words: int = 30) -> str:
  """ALBEF / TCL's caption cleaning (`dataset/utils.py: pre_caption`, applied to every training
  and evaluation caption there): lower case; drop `, . ' ! ? " ( ) * # : ; ~`; `-` and `/` become
  spaces and `<person>` the word person; runs of whitespace become one space; strip; keep the first
  `max_words` space-separated words."""
  text = _ALBEF_PUNCTUATION.sub("", caption.lower())
  text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
  text = _RUNS_OF_SPACES.sub(" ", text).rstrip("\n").strip(" ")
  words = text.split(" ")
  return " ".join(words[:max_words]) if len(words) > max_words else text


CAPTION_CLEANERS = ("none", "albef")


class CleanedTokenizer:
  """A tokenizer that cleans every text first (`data.caption_preprocess`); the rest is the base
  tokenizer's.

  Args:
    base: any tokenizer of this module.
    max_words: words kept by `albef_pre_caption` (ALBEF / TCL: 30).
  """

  def __init__(self, base: Tokenizer, max_words: int = 30):
    self.base = base
    self.max_words = int(max_words)
    for name in ("vocab_size", "pad_id", "cls_id", "eos_id", "mask_id", "unk_id"):
      setattr(self, name, getattr(base, name))

  def clean(self, text: str) -> str:
    return albef_pre_caption(text, self.max_words)

  def token_ids(self, text: str) -> list[int]:
    return self.base.token_ids(self.clean(text))

  def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    return self.base.encode(self.clean(text), max_len)

  def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    return self.base.encode_batch([self.clean(t) for t in texts], max_len)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self.base.decode(ids)


TOKENIZERS = ("shapes_words", "tokenizer_json", "sentencepiece")


def build_tokenizer(data_config: Any) -> Tokenizer:
  """The tokenizer named by `data_config.tokenizer` (default "shapes_words"); `tokenizer_json` and
  `sentencepiece` read `data_config.tokenizer_path` (a location as in
  `vlalign.weights.hf.resolve_location`). With `data_config.text_template` set, every text goes
  through that prompt (`PromptTokenizer`). With `data.caption_preprocess = "albef"`, every text is
  first cleaned as ALBEF / TCL clean captions (`albef_pre_caption`, `data.caption_max_words` 30)."""
  base = _base_tokenizer(data_config)
  cleaner = data_config.get("caption_preprocess") or "none"
  if cleaner not in CAPTION_CLEANERS:
    raise ConfigError(
      f"data.caption_preprocess={cleaner!r} is not one of {CAPTION_CLEANERS} (albef: ALBEF / "
      "TCL's pre_caption)"
    )
  if cleaner == "albef":
    base = CleanedTokenizer(base, int(data_config.get("caption_max_words", 30)))
  template = data_config.get("text_template")
  return PromptTokenizer(base, template) if template else base


def _base_tokenizer(data_config: Any) -> Tokenizer:
  name = data_config.get("tokenizer", "shapes_words")
  if name == "shapes_words":
    return WordTokenizer(shapes.vocabulary())
  if name in ("tokenizer_json", "sentencepiece"):
    from vlalign.weights import hf  # noqa: PLC0415

    if not data_config.get("tokenizer_path"):
      raise ConfigError(f"data.tokenizer={name!r} needs data.tokenizer_path")
    path = hf.resolve_location(data_config.tokenizer_path, "data.tokenizer_path")
    return JsonTokenizer(path) if name == "tokenizer_json" else SentencePieceTokenizer(path)
  raise ConfigError(f"unknown tokenizer {name!r}; available: {list(TOKENIZERS)}")
