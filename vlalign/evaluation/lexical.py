"""Evaluators of lexical representations (LexVLA): patch-level discrimination and word precision.

A lexical representation is a non-negative vector over a lexicon of `V` words: entry `j` is how
strongly the sample relates to word `j` (`lexicon_ids[j]` is that word's tokenizer id). A method
with lexical representations provides the prediction functions (host numpy in and out)

* `lexical_patches(params, images [B, H, W, 3]) -> [B, N, V]`: one vector per patch, `N = g * g`
  patches in row-major order of the `g x g` patch grid;
* `lexical_image(params, images) -> [B, V]` and `lexical_text(params, ids [B, L], mask [B, L])
  -> [B, V]`;
* `lexicon_ids(params) -> [V]` int.

Images are passed normalised (`vlalign.data.transforms.normalize_image`), as every evaluator does.
Both evaluators stream their split in batches of `batch_size` images and keep only running counts,
but each batch's predictions are on the host at once: `[batch_size, N, V]` float32 patch vectors for
`patchdis` (256 images of 196 patches over a 32k-word lexicon are 6.4 GB), so give it a small
`batch_size` with a large lexicon.

Several processes (`sharding.host_fn` prediction functions): as the retrieval and zero-shot
evaluators do (`retrieval.embed_in_batches`), each process loads (decodes) only the images of each
batch that its devices hold; the predictions come back whole, each process counts the rows it owns
and the integer counts (confusion matrices, per-image hits, caption words, active entries) are
summed over the processes, so every process returns the metrics one process would.

`patchdis` (PatchDis, LexVLA's patch-level discrimination, a zero-shot segmentation of the embedded
shapes dataset). Each class (a shape, or a colour, with `task="color"`) gets a text vector: every
prompt template filled with the class name goes through `lexical_text`, each vector is
L2-normalised and the mean over templates is normalised again (`zeroshot.class_embeddings`). A
patch scores the cosine similarity of its vector with each class vector (`class_scores`; in
[0, 1] for non-negative vectors). The `[g, g]` score maps are upsampled bilinearly to the image's
`S x S` pixels (`upsample_grid`), a constant background channel `background_threshold` is put in
front and every pixel takes the argmax: 0 = background, `c + 1` = class `c` (a tie goes to the
background, then to the lower class). The target of a pixel is the class of the object drawn there
(`pixel_targets`). Metrics, in percent:

* `miou`: the mean intersection-over-union over the `C + 1` labels (background included) that occur
  in the target or the prediction of the split (`mean_iou`);
* `miou_objects`: the same over the object pixels only (background pixels of the target are left
  out) with each pixel labelled by its best class, no background channel: it does not depend on
  `background_threshold`;
* `pixel_acc`: the percent of all pixels labelled right (background included).

The default `background_threshold` is 0.2: a pixel whose best class is less similar than that
(cosines of non-negative vectors lie in [0, 1]) is background. It suits sparse vectors that leave
the background patches (nearly) empty; a model whose background patches activate the template
words of the prompts needs a higher one, which `miou` against `miou_objects` shows.

`lexical_words` (word precision): for each image, the `k` lexicon entries with the highest positive
values of `lexical_image` (entries equal to 0 are not activated and never count; stop words are
not skipped, so a model that activates "a" is penalised) against the image's caption words, the
tokenizer ids of all its captions' tokens except the special tokens (pad, cls, eos, mask, unk) and
the `ignore_words` (function words and punctuation; a word counts as ignored when it encodes to one
token by itself). Metrics:

* `precision_at_{k}`: percent of the `k` slots holding a caption word, `|top-k ids & words| / k`,
  averaged over images;
* `recall_at_{k}`: percent of the caption words among the top-k, `|top-k ids & words| / |words|`,
  averaged over the images with at least one caption word;
* `active`: the mean number of non-zero entries of `lexical_image`.

Settings (besides `every_steps` and `batch_size`), e.g.

    patchdis_shape=dict(type="patchdis", split="test", task="shape", every_steps=0),
    words_test=dict(type="lexical_words", split="test", k=5, every_steps=0),

* `patchdis`: `split` (required); `task` "shape" (default) or "color"; `templates` (default: the
  zero-shot task's, `shapes.ZEROSHOT_TASKS[task].templates`); `background_threshold` (default 0.2);
  `max_images` (default: the whole split); `max_len` of the prompts (default `data.eval_max_len`,
  itself defaulting to `data.max_len`).
* `lexical_words`: `split` (required); `k` (default 5); `ignore_words` (default
  `DEFAULT_IGNORE_WORDS`); `max_images` (default: the whole split).

The upsampling is numpy (`interpolation_matrix`: half-pixel centres, edge samples extended), equal
to `jax.image.resize(..., method="linear")` for upsampling.
"""

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from vlalign.errors import ConfigError
from vlalign.evaluation.common import EVALUATORS, EvalContext, check_keys
from vlalign.evaluation.zeroshot import class_embeddings, prompts
from vlalign.sharding import ProcessRows, owned_rows, rows_to_load, sum_over_processes

# Task -> the example field holding each object's class (`shapes.ZEROSHOT_TASKS[task]` names the
# classes and gives the default templates).
TASKS = {"shape": "object_shape", "color": "object_color"}
DEFAULT_BACKGROUND_THRESHOLD = 0.2
DEFAULT_K = 5
# Function words and punctuation of English captions; positions ("left", "top") are content.
DEFAULT_IGNORE_WORDS = (
  *("a", "an", "the", "of", "and", "in", "on", "at", "to", "is", "are", "with", "there", "that"),
  *("also", ",", "."),
)
# Caption length (tokens) when reading the caption words: long enough that no word is cut.
CAPTION_MAX_LEN = 256
# Images whose pixel labels are computed at once (bounds the `[chunk, S, S, C]` float32 maps).
_PIXEL_CHUNK = 16


# --- PatchDis: pure functions -------------------------------------------------------------------


def _unit_rows(x: np.ndarray) -> np.ndarray:
  """Rows L2-normalised along the last axis; zero rows stay zero."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_scores(patch_lex: np.ndarray, class_lex: np.ndarray) -> np.ndarray:
  """Cosine similarity of every patch with every class.

  Args:
    patch_lex: `[B, N, V]` patch vectors.
    class_lex: `[C, V]` class vectors.

  Returns:
    `[B, N, C]` float32; 0 where either vector is zero.
  """
  patch_lex, class_lex = np.asarray(patch_lex), np.asarray(class_lex)
  if patch_lex.ndim != 3 or class_lex.ndim != 2 or patch_lex.shape[-1] != class_lex.shape[-1]:
    raise ValueError(
      f"expected patch vectors [B, N, V] and class vectors [C, V]; got {patch_lex.shape} and "
      f"{class_lex.shape}"
    )
  return np.einsum("bnv,cv->bnc", _unit_rows(patch_lex), _unit_rows(class_lex))


def grid_side(num_patches: int) -> int:
  """`g` with `g * g == num_patches`; ValueError when `num_patches` is not a square."""
  side = math.isqrt(int(num_patches))
  if side < 1 or side * side != num_patches:
    raise ValueError(f"{num_patches} patches do not form a square grid")
  return side


def interpolation_matrix(src: int, dst: int) -> np.ndarray:
  """`[dst, src]` float32 weights of 1-D linear interpolation from `src` to `dst` samples.

  Half-pixel centres: output sample `i` reads the input at `(i + 0.5) * src / dst - 0.5`, clamped to
  `[0, src - 1]` (the edge samples extend outwards). Every row sums to 1. For upsampling this is
  what `jax.image.resize(..., method="linear")` does.
  """
  pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0.0, src - 1)
  lo = np.floor(pos).astype(np.int64)
  hi = np.minimum(lo + 1, src - 1)
  frac = pos - lo
  weights = np.zeros((dst, src), np.float64)
  np.add.at(weights, (np.arange(dst), lo), 1.0 - frac)
  np.add.at(weights, (np.arange(dst), hi), frac)
  return weights.astype(np.float32)


def upsample_grid(grid: np.ndarray, size: int) -> np.ndarray:
  """Bilinear upsampling of square maps (numpy, separable `interpolation_matrix`).

  Args:
    grid: `[B, g, g, C]` maps.
    size: output side `S`.

  Returns:
    `[B, S, S, C]` float32.
  """
  grid = np.asarray(grid, np.float32)
  weights = interpolation_matrix(grid.shape[1], size)
  return np.einsum("sg,bghc,th->bstc", weights, grid, weights)


def pixel_scores(scores: np.ndarray, image_size: int) -> np.ndarray:
  """Patch scores `[B, N, C]` (row-major `g x g` grid) -> `[B, S, S, C]` upsampled bilinearly."""
  scores = np.asarray(scores, np.float32)
  side = grid_side(scores.shape[1])
  return upsample_grid(scores.reshape(len(scores), side, side, scores.shape[2]), image_size)


def labels_with_background(pixel_score: np.ndarray, background_threshold: float) -> np.ndarray:
  """`[B, S, S, C]` scores -> `[B, S, S]` int32 labels: 0 = background (no class scores above
  `background_threshold`), `c + 1` = class `c`."""
  pixel_score = np.asarray(pixel_score, np.float32)
  background = np.full((*pixel_score.shape[:-1], 1), background_threshold, np.float32)
  return np.argmax(np.concatenate([background, pixel_score], axis=-1), axis=-1).astype(np.int32)


def patch_labels_to_pixels(
  scores: np.ndarray, image_size: int, background_threshold: float
) -> np.ndarray:
  """Pixel labels of patch-level class scores.

  Args:
    scores: `[B, N, C]` scores of `N = g * g` patches in row-major grid order.
    image_size: side `S` of the images.
    background_threshold: the score of the background channel put before the classes.

  Returns:
    `[B, S, S]` int32: 0 = background, `c + 1` = class `c` (the argmax of the bilinearly
    upsampled scores with the background channel first; ties go to the lower label).
  """
  return labels_with_background(pixel_scores(scores, image_size), background_threshold)


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
  """Counts of (target, prediction) pairs; entries whose target is negative are left out.

  Args:
    pred: int labels in `[0, K)`, any shape.
    target: int labels of the same shape, in `[0, K)` or negative (ignored).
    num_classes: `K`.

  Returns:
    `[K, K]` int64: row = target label, column = predicted label.
  """
  pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
  if pred.shape != target.shape:
    raise ValueError(f"pred and target differ in size: {pred.size} vs {target.size}")
  keep = target >= 0
  pred, target = pred[keep].astype(np.int64), target[keep].astype(np.int64)
  if pred.size and (pred.min() < 0 or pred.max() >= num_classes or target.max() >= num_classes):
    raise ValueError(f"labels outside [0, {num_classes})")
  counts = np.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes)


def mean_iou(confusion: np.ndarray) -> tuple[float, np.ndarray]:
  """`(miou, iou [K])` of a confusion matrix (row = target, column = prediction).

  `iou[k] = TP / (TP + FP + FN)` is NaN for a label in neither the target nor the prediction;
  `miou` is the mean over the others (fractions in [0, 1]; NaN when there are none).
  """
  confusion = np.asarray(confusion, np.float64)
  hits = np.diag(confusion)
  union = confusion.sum(axis=0) + confusion.sum(axis=1) - hits
  iou = np.full(len(confusion), np.nan)
  present = union > 0
  iou[present] = hits[present] / union[present]
  return (float(np.mean(iou[present])) if present.any() else float("nan")), iou


def pixel_targets(mask: np.ndarray, object_class: np.ndarray) -> np.ndarray:
  """Target labels of one image.

  Args:
    mask: `[S, S]` int, 0 = background, k = the k-th object (1-based).
    object_class: `[M]` int class of each object, -1 padded.

  Returns:
    `[S, S]` int32: 0 on background, `object_class[k - 1] + 1` on object k's pixels.
  """
  mask, object_class = np.asarray(mask), np.asarray(object_class)
  lookup = np.concatenate([[0], object_class.astype(np.int64) + 1])
  drawn = np.unique(mask[mask > 0])
  if drawn.size and (drawn.max() > len(object_class) or np.any(lookup[drawn] <= 0)):
    raise ValueError(f"mask objects {drawn.tolist()} have no class in {object_class.tolist()}")
  return lookup[mask].astype(np.int32)


# --- Word precision: pure functions -------------------------------------------------------------


def top_lexicon_ids(image_lex: np.ndarray, lexicon_ids: np.ndarray, k: int) -> np.ndarray:
  """Tokenizer ids of each row's `k` highest positive entries, best first.

  Args:
    image_lex: `[B, V]` non-negative vectors.
    lexicon_ids: `[V]` tokenizer id of each entry.
    k: entries per row, `1 <= k <= V`.

  Returns:
    `[B, k]` int64; -1 fills the slots of a row with fewer than `k` positive entries. Ties are
    broken by the lower entry index.
  """
  image_lex, lexicon_ids = np.asarray(image_lex), np.asarray(lexicon_ids)
  order = np.argsort(-image_lex, axis=1, kind="stable")[:, :k]
  active = np.take_along_axis(image_lex, order, axis=1) > 0
  return np.where(active, lexicon_ids[order], -1).astype(np.int64)


def special_ids(tokenizer: Any) -> set[int]:
  """The ids of the tokenizer's special tokens (pad, cls, eos, mask, unk) it defines."""
  names = ("pad_id", "cls_id", "eos_id", "mask_id", "unk_id")
  return {int(i) for i in (getattr(tokenizer, n, None) for n in names) if i is not None}


def ignored_ids(tokenizer: Any, words: Sequence[str]) -> set[int]:
  """Ids of the `words` that encode to exactly one (non-special) token by themselves."""
  if not words:
    return set()
  ids, mask = tokenizer.encode_batch(list(words), 16)
  specials = special_ids(tokenizer)
  out = set()
  for row, row_mask in zip(np.asarray(ids), np.asarray(mask)):
    tokens = [int(t) for t, m in zip(row, row_mask) if m and int(t) not in specials]
    if len(tokens) == 1:
      out.add(tokens[0])
  return out


def caption_word_ids(
  tokenizer: Any, captions: Sequence[Sequence[str]], ignore: set[int]
) -> list[set[int]]:
  """For each image, the set of token ids of its captions, without special and `ignore` ids.

  Args:
    tokenizer: has `encode_batch(texts, max_len)` and the special ids (`special_ids`).
    captions: the captions of each image.
    ignore: ids to leave out (`ignored_ids`).
  """
  flat = [c for image_captions in captions for c in image_captions]
  ids, mask = tokenizer.encode_batch(flat, CAPTION_MAX_LEN)
  ids, mask = np.asarray(ids), np.asarray(mask)
  drop = special_ids(tokenizer) | set(ignore)
  out, row = [], 0
  for image_captions in captions:
    rows = slice(row, row + len(image_captions))
    words = {int(t) for t in ids[rows][mask[rows] > 0].tolist()}
    out.append(words - drop)
    row += len(image_captions)
  return out


def word_hits(top_ids: np.ndarray, words: Sequence[set[int]]) -> np.ndarray:
  """`[B]` int64: how many distinct ids of each row of `top_ids` (`[B, k]`, -1 = empty slot) are
  among that image's caption words."""
  return np.array(
    [len({int(t) for t in row if t >= 0} & w) for row, w in zip(top_ids, words)], np.int64
  )


# --- Shared evaluator helpers -------------------------------------------------------------------


class _Batch(NamedTuple):
  """What one process sees of a batch of `_split_batches`.

  Attributes:
    rows: `[b]` int64 the split's rows this process counts in its metrics, in order.
    examples: their examples.
    outputs: `fn`'s host float32 outputs for them, `[b, ...]`.
  """

  rows: np.ndarray
  examples: list
  outputs: np.ndarray


class _SplitBatches:
  """Called with `(params, count)`: the first `count` examples of `source` through
  `fn(params, images)` in batches of `batch_size` rows (the last padded by repeating its last row:
  one shape compiles), images stacked and normalised (`[b, S, S, 3]` float32, as every evaluator
  passes them).

  Several processes: as in `retrieval.embed_in_batches`, when `fn` tells which rows of a batch
  this process's devices hold (`process_rows`, a `sharding.host_fn` function), the process loads
  (decodes) only the examples of those rows and passes their images as `sharding.ProcessRows`;
  `fn`'s outputs are the whole batch on every process. Each process then counts the rows it owns
  (`sharding.owned_rows`: every row by exactly one process), so metrics built from per-row
  integer counts and summed over the processes (`sharding.sum_over_processes`) equal those of one
  process. Every process must iterate the same batches (the collectives are global).

  Attributes:
    decoded: examples this process has loaded so far (each distinct row of a batch once).
  """

  def __init__(self, fn: Callable[..., Any], source: Any, batch_size: int):
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive; got {batch_size}")
    self._fn, self._source, self.batch_size = fn, source, int(batch_size)
    self._local = rows_to_load(fn, self.batch_size)  # None: the whole batch
    self._positions = np.arange(self.batch_size) if self._local is None else self._local
    self._owned = None  # positions this process counts; a collective, so computed in __call__
    self.decoded = 0

  def __call__(self, params: Any, count: int) -> Iterator[_Batch]:
    from vlalign.data import transforms  # Imported here: evaluators need no data code until built.

    if self._owned is None:
      self._owned = owned_rows(self._positions, self.batch_size)
    counted_positions = np.isin(self._positions, self._owned)
    for start in range(0, count, self.batch_size):
      real = min(self.batch_size, count - start)
      batch_rows = start + np.minimum(np.arange(self.batch_size), real - 1)  # last one repeated
      rows = batch_rows[self._positions]
      distinct, inverse = np.unique(rows, return_inverse=True)
      loaded = [self._source[int(i)] for i in distinct]
      self.decoded += len(distinct)
      examples = [loaded[j] for j in inverse.reshape(-1)]
      images = transforms.normalize_image(np.stack([ex["image"] for ex in examples]))
      arg = images if self._local is None else ProcessRows(images, self.batch_size)
      out = np.asarray(jax.device_get(self._fn(params, arg)), np.float32)
      if len(out) != self.batch_size:
        raise ValueError(
          f"a prediction function returned {len(out)} rows for a batch of {self.batch_size}"
        )
      counted = np.flatnonzero(counted_positions & (self._positions < real))
      positions = self._positions[counted]
      yield _Batch(batch_rows[positions], [examples[i] for i in counted], out[positions])


def _lexicon(fn: Callable[[Any], Any], params: Any) -> np.ndarray:
  ids = np.asarray(jax.device_get(fn(params)))
  if ids.ndim != 1:
    raise ValueError(f"lexicon_ids returned shape {ids.shape}; expected [V]")
  return ids.astype(np.int64)


def _count(settings: dict, name: str, key: str, default: int | None) -> int | None:
  value = settings.get(key, default)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f"evaluator {name!r}: {key}={value!r} must be a positive integer")
  return value


def _split_count(ctx: EvalContext, split: str, max_images: int | None) -> int:
  from vlalign.data import pipeline  # Imported here: evaluators need no data code until built.

  size = pipeline.split_size(ctx.data_config, split)
  return size if max_images is None else min(size, max_images)


# --- PatchDis evaluator -------------------------------------------------------------------------


class PatchDisEvaluator:
  """Patch-level discrimination of a shapes split (see the module docstring).

  Streams the split in batches of `batch_size` images; keeps only the confusion matrices.
  """

  def __init__(
    self,
    name: str,
    lexical_patches_fn: Callable[[Any, np.ndarray], Any],
    lexical_text_fn: Callable[[Any, np.ndarray, np.ndarray], Any],
    tokenizer: Any,
    source: Any,
    *,
    task: str = "shape",
    templates: Sequence[str] | None = None,
    background_threshold: float = DEFAULT_BACKGROUND_THRESHOLD,
    max_images: int | None = None,
    batch_size: int = 64,
    every_steps: int = 0,
    max_len: int = 24,
  ):
    """Builds the evaluator.

    Args:
      name: the evaluator's name (metrics are logged as `eval/<name>/<metric>`).
      lexical_patches_fn: `(params, images [B, S, S, 3]) -> [B, N, V]`.
      lexical_text_fn: `(params, ids [B, L], mask [B, L]) -> [B, V]`.
      tokenizer: has `encode_batch(texts, max_len) -> (ids, mask)`.
      source: random-access examples with `image [S, S, 3]` uint8, `mask [S, S]` and the
        `object_shape` / `object_color` of the task (a `shapes.ShapesSource`).
      task: "shape" or "color" (`TASKS`).
      templates: prompts with one `{}` each; None: the zero-shot task's (`shapes.ZEROSHOT_TASKS`).
      background_threshold: the background channel's score.
      max_images: evaluate the first this many images; None: all.
      batch_size: images per prediction call (the last batch is padded).
      every_steps: run every this many train steps; 0 = only at the end of training.
      max_len: token length of the prompts.
    """
    if task not in TASKS:
      raise ConfigError(f"evaluator {name!r}: unknown task {task!r}; choose one of {list(TASKS)}")
    self.name = name
    self.every_steps = int(every_steps)
    self.batch_size = int(batch_size)
    self.max_len = int(max_len)
    self.background_threshold = float(background_threshold)
    from vlalign.data import shapes  # Imported here: evaluators need no data code until built.

    self.attribute = TASKS[task]
    self.class_names = list(shapes.ZEROSHOT_TASKS[task].class_names)
    if templates is None:
      templates = shapes.ZEROSHOT_TASKS[task].templates
    self.templates = list(templates)
    prompts(self.class_names, self.templates)  # Validates the templates now rather than at run.
    self._patches = lexical_patches_fn
    self._text = lexical_text_fn
    self._tokenizer = tokenizer
    self.source = source
    self.num_images = len(source) if max_images is None else min(len(source), int(max_images))
    self._batches = _SplitBatches(lexical_patches_fn, source, self.batch_size)

  @property
  def decoded(self) -> int:
    """Examples (images) this process has loaded so far (its rows only, on several processes)."""
    return self._batches.decoded

  def class_vectors(self, params: Any) -> np.ndarray:
    """`[C, V]` prompt-ensembled unit class vectors."""
    return class_embeddings(
      self._text,
      params,
      self._tokenizer,
      self.class_names,
      self.templates,
      self.max_len,
      self.batch_size,
    )

  def confusions(self, params: Any) -> tuple[np.ndarray, np.ndarray]:
    """`(confusion [C + 1, C + 1] with background, confusion [C, C] of the object pixels)`."""
    num_classes = len(self.class_names)
    class_lex = self.class_vectors(params)
    full = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    objects = np.zeros((num_classes, num_classes), np.int64)
    for batch in self._batches(params, self.num_images):
      if not batch.examples:
        continue  # This process counts none of the batch's rows.
      patch_lex = batch.outputs
      if patch_lex.ndim != 3:
        raise ValueError(f"lexical_patches returned shape {patch_lex.shape}; expected [B, N, V]")
      examples = batch.examples
      scores = class_scores(patch_lex, class_lex)  # [b, N, C]
      for start in range(0, len(examples), _PIXEL_CHUNK):
        chunk = examples[start : start + _PIXEL_CHUNK]
        target = np.stack([pixel_targets(ex["mask"], ex[self.attribute]) for ex in chunk])
        maps = pixel_scores(scores[start : start + _PIXEL_CHUNK], target.shape[1])
        pred = labels_with_background(maps, self.background_threshold)
        full += confusion_matrix(pred, target, num_classes + 1)
        objects += confusion_matrix(np.argmax(maps, axis=-1), target - 1, num_classes)
    # Each process counted the rows it owns: the sums are the counts of the whole split.
    return sum_over_processes(full), sum_over_processes(objects)

  def run(self, params: Any, step: int | None = None) -> dict[str, float]:
    """`{"miou", "miou_objects", "pixel_acc"}` in percent."""
    del step  # Writes no files.
    full, objects = self.confusions(params)
    return {
      "miou": 100.0 * mean_iou(full)[0],
      "miou_objects": 100.0 * mean_iou(objects)[0],
      "pixel_acc": float(100.0 * np.trace(full) / max(full.sum(), 1)),
    }


def _check_templates(name: str, templates: Any) -> list[str] | None:
  if templates is None:
    return None
  if isinstance(templates, str) or not all(isinstance(t, str) for t in templates) or not templates:
    raise ConfigError(f"evaluator {name!r}: templates must be a non-empty list of strings")
  prompts(["x"], list(templates))
  return list(templates)


def _check_threshold(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
    raise ConfigError(f"evaluator {name!r}: background_threshold={value!r} must be a finite number")
  return float(value)


@EVALUATORS.register("patchdis")
def build_patchdis(name: str, settings: dict, ctx: EvalContext) -> PatchDisEvaluator | None:
  """Builder for `type: "patchdis"` (fields `split`, `task`, `templates`, `background_threshold`,
  `max_images`, `max_len`, `every_steps`, `batch_size`); needs a method with lexical
  representations (`lexical_patches`, `lexical_text`)."""
  optional = {"task", "templates", "background_threshold", "max_images", "max_len"}
  check_keys(name, settings, {"split"}, optional)
  task = settings.get("task", "shape")
  if task not in TASKS:
    raise ConfigError(f"evaluator {name!r}: unknown task {task!r}; choose one of {list(TASKS)}")
  templates = _check_templates(name, settings.get("templates"))
  threshold = _check_threshold(
    name, settings.get("background_threshold", DEFAULT_BACKGROUND_THRESHOLD)
  )
  max_images = _count(settings, name, "max_images", None)
  kind = "patchdis (a method with lexical representations, e.g. 'lexvla')"
  patches = ctx.predict_fn("lexical_patches", name, kind)
  text = ctx.predict_fn("lexical_text", name, kind)
  _split_count(ctx, settings["split"], max_images)
  if ctx.check_only:
    return None
  from vlalign.data import pipeline

  return PatchDisEvaluator(
    name,
    patches,
    text,
    ctx.tokenizer,
    pipeline.make_source(ctx.data_config, settings["split"]),
    task=task,
    templates=templates,
    background_threshold=threshold,
    max_images=max_images,
    batch_size=settings.get("batch_size", ctx.default_batch_size),
    every_steps=settings.get("every_steps", 0),
    max_len=settings.get("max_len", pipeline.eval_text_len(ctx.data_config)),
  )


# --- Word precision evaluator -------------------------------------------------------------------


class LexicalWordsEvaluator:
  """Top-k words of each image's lexical vector against its caption words (module docstring).

  Streams the split in batches of `batch_size` images.
  """

  def __init__(
    self,
    name: str,
    lexical_image_fn: Callable[[Any, np.ndarray], Any],
    lexicon_ids_fn: Callable[[Any], Any],
    tokenizer: Any,
    source: Any,
    *,
    k: int = DEFAULT_K,
    ignore_words: Sequence[str] = DEFAULT_IGNORE_WORDS,
    max_images: int | None = None,
    batch_size: int = 64,
    every_steps: int = 0,
  ):
    """Builds the evaluator.

    Args:
      name: the evaluator's name (metrics are logged as `eval/<name>/<metric>`).
      lexical_image_fn: `(params, images [B, S, S, 3]) -> [B, V]`.
      lexicon_ids_fn: `(params) -> [V]` tokenizer id of each lexicon entry.
      tokenizer: has `encode_batch(texts, max_len)` and the special ids.
      source: random-access examples with `image [S, S, 3]` uint8 and `captions` (str).
      k: words per image.
      ignore_words: caption words that are not content (`ignored_ids`).
      max_images: evaluate the first this many images; None: all.
      batch_size: images per prediction call (the last batch is padded).
      every_steps: run every this many train steps; 0 = only at the end of training.
    """
    self.name = name
    self.every_steps = int(every_steps)
    self.batch_size = int(batch_size)
    self.k = int(k)
    if self.k < 1:
      raise ConfigError(f"evaluator {name!r}: k={k} must be positive")
    self._image = lexical_image_fn
    self._lexicon = lexicon_ids_fn
    self._tokenizer = tokenizer
    self.ignore = ignored_ids(tokenizer, list(ignore_words))
    self.source = source
    self.num_images = len(source) if max_images is None else min(len(source), int(max_images))
    self._batches = _SplitBatches(lexical_image_fn, source, self.batch_size)

  @property
  def decoded(self) -> int:
    """Examples (images) this process has loaded so far (its rows only, on several processes)."""
    return self._batches.decoded

  def run(self, params: Any, step: int | None = None) -> dict[str, float]:
    """`{"precision_at_{k}", "recall_at_{k}" (percent), "active"}`."""
    del step  # Writes no files.
    lexicon_ids = _lexicon(self._lexicon, params)
    if self.k > len(lexicon_ids):
      raise ConfigError(
        f"evaluator {self.name!r}: k={self.k} exceeds the lexicon's {len(lexicon_ids)} words"
      )
    # Per-image counts, filled at the rows this process counts and summed over the processes.
    hits = np.zeros(self.num_images, np.int64)
    num_words = np.zeros(self.num_images, np.int64)
    active = np.zeros(self.num_images, np.int64)
    for batch in self._batches(params, self.num_images):
      if not batch.examples:
        continue  # This process counts none of the batch's rows.
      image_lex, examples = batch.outputs, batch.examples
      if image_lex.ndim != 2 or image_lex.shape[1] != len(lexicon_ids):
        raise ValueError(
          f"lexical_image returned shape {image_lex.shape}; expected [B, {len(lexicon_ids)}]"
        )
      words = caption_word_ids(self._tokenizer, [ex["captions"] for ex in examples], self.ignore)
      hits[batch.rows] = word_hits(top_lexicon_ids(image_lex, lexicon_ids, self.k), words)
      num_words[batch.rows] = [len(w) for w in words]
      active[batch.rows] = np.sum(image_lex > 0, axis=1)
    hits, num_words, active = (sum_over_processes(x) for x in (hits, num_words, active))
    has_words = num_words > 0
    return {
      f"precision_at_{self.k}": float(100.0 * np.mean(hits / self.k)),
      f"recall_at_{self.k}": (
        float(100.0 * np.mean(hits[has_words] / num_words[has_words]))
        if has_words.any()
        else float("nan")
      ),
      "active": float(np.mean(active)),
    }


@EVALUATORS.register("lexical_words")
def build_lexical_words(
  name: str, settings: dict, ctx: EvalContext
) -> LexicalWordsEvaluator | None:
  """Builder for `type: "lexical_words"` (fields `split`, `k`, `ignore_words`, `max_images`,
  `every_steps`, `batch_size`); needs `lexical_image` and `lexicon_ids`."""
  check_keys(name, settings, {"split"}, {"k", "ignore_words", "max_images"})
  k = _count(settings, name, "k", DEFAULT_K)
  ignore_words = settings.get("ignore_words", DEFAULT_IGNORE_WORDS)
  if isinstance(ignore_words, str) or not all(isinstance(w, str) for w in ignore_words):
    raise ConfigError(f"evaluator {name!r}: ignore_words must be a list of strings")
  max_images = _count(settings, name, "max_images", None)
  kind = "lexical_words (a method with lexical representations, e.g. 'lexvla')"
  image = ctx.predict_fn("lexical_image", name, kind)
  lexicon = ctx.predict_fn("lexicon_ids", name, kind)
  _split_count(ctx, settings["split"], max_images)
  if ctx.check_only:
    return None
  from vlalign.data import pipeline

  return LexicalWordsEvaluator(
    name,
    image,
    lexicon,
    ctx.tokenizer,
    pipeline.make_source(ctx.data_config, settings["split"]),
    k=k,
    ignore_words=list(ignore_words),
    max_images=max_images,
    batch_size=settings.get("batch_size", ctx.default_batch_size),
    every_steps=settings.get("every_steps", 0),
  )
