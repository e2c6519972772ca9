"""Zero-shot classification with prompt ensembling, as in CLIP.

Each class is embedded by filling every template ("a photo of a {}.") with its name, encoding the
texts, L2-normalising each, averaging over templates and normalising again. An image is assigned the
class whose embedding has the highest dot product with the image embedding (the first such class on
ties). Accuracy is in percent; chance is `100 / C` for `C` classes.

Two kinds of data (evaluator type `zeroshot`):

- `task` + `split`: a task of the embedded shapes dataset (`vlalign.data.shapes.ZEROSHOT_TASKS`),
  loaded whole (`ZeroShotEvaluator`; metrics `acc`, `chance`).
- `dataset`: labelled images on disk, streamed (`StreamingZeroShotEvaluator`): an ImageNet-style
  folder tree or a prepared TFDS builder (`vlalign.data.folder`), e.g.
  `dict(format="image_folder", root="/data/imagenet/val", classnames="imagenet")`. The images are
  decoded batch by batch by a thread pool (`pipeline.ImageRows`), so host memory holds one batch of
  pixels whatever the dataset's size. Metrics `acc` (top-1), `acc5` (top-5, only with more than 5
  classes), `chance`, `skipped_images`.
"""

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from vlalign.errors import ConfigError
from vlalign.evaluation.common import EVALUATORS, EvalContext, check_keys
from vlalign.evaluation.retrieval import embed_in_batches
from vlalign.sharding import union_over_processes

# Prompts tokenised and encoded at once, in batches: bounds the host memory of the text side.
_PROMPT_CHUNK_BATCHES = 16


class Tokenizer(Protocol):
  def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [N, L] int32, mask [N, L] int32)`."""
    ...


def _l2_normalise(x: np.ndarray, axis: int = -1) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
  """The `C * T` prompts, class-major: `templates[t].format(class_names[c])` at `c * T + t`."""
  for template in templates:
    if template.count("{}") != 1:
      raise ConfigError(f"template {template!r} must contain exactly one '{{}}'")
  return [template.format(name) for name in class_names for template in templates]


def class_embeddings(
  encode_text_fn: Callable[[Any, np.ndarray, np.ndarray], Any],
  params: Any,
  tokenizer: Tokenizer,
  class_names: Sequence[str],
  templates: Sequence[str],
  max_len: int,
  batch_size: int = 256,
) -> np.ndarray:
  """Prompt-ensembled class embeddings.

  Args:
    encode_text_fn: `(params, ids [B, L], mask [B, L]) -> [B, E]`.
    params: model parameters, passed through.
    tokenizer: has `encode_batch(texts, max_len) -> (ids, mask)`.
    class_names: `C` class names.
    templates: `T` templates, each with one `{}`.
    max_len: token length `L`.
    batch_size: texts per encode call (the last batch is padded).

  Returns:
    `[C, E]` float32 unit vectors: the renormalised mean over templates of the normalised text
    embeddings.

  The `C * T` prompts are tokenised and encoded in chunks of `_PROMPT_CHUNK_BATCHES` batches (a
  multiple of `batch_size`, so the batches are those of one pass over all prompts), and only the
  per-class sums are kept: host memory stays bounded for 1000 classes x 80 templates.
  """
  if not class_names or not templates:
    raise ValueError("need at least one class name and one template")
  texts = prompts(class_names, templates)
  num_templates = len(templates)
  sums = None  # [C, E] float64: sums over templates of the normalised text embeddings
  chunk = _PROMPT_CHUNK_BATCHES * batch_size
  for start in range(0, len(texts), chunk):
    ids, mask = tokenizer.encode_batch(texts[start : start + chunk], max_len)
    text_emb = _l2_normalise(embed_in_batches(encode_text_fn, params, (ids, mask), batch_size))
    if sums is None:
      sums = np.zeros((len(class_names), text_emb.shape[1]), np.float64)
    classes = np.arange(start, start + len(text_emb)) // num_templates
    np.add.at(sums, classes, text_emb)
  return _l2_normalise(sums / num_templates).astype(np.float32)


def top1_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> float:
  """Percent of images whose highest-scoring class is their label; NaN if any score is not finite.

  Args:
    image_emb: `[M, E]` image embeddings.
    class_emb: `[C, E]` class embeddings.
    labels: `[M]` int class indices.
  """
  logits = image_emb @ class_emb.T  # [M, C]
  if not np.all(np.isfinite(logits)):
    return float("nan")
  return float(100.0 * np.mean(np.argmax(logits, axis=1) == labels))


def label_ranks(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Rank of each row's label among the classes sorted by descending score, 0 = first.

  Ties go to the lower class index (a class with the label's score counts as ahead of it when its
  index is lower), so rank 0 is exactly `np.argmax`'s choice and top-k sets nest.

  Args:
    logits: `[M, C]` image-class scores.
    labels: `[M]` int class indices.

  Returns:
    `[M]` int64 ranks in `[0, C)`.
  """
  logits = np.asarray(logits)
  labels = np.asarray(labels, dtype=np.int64)
  own = np.take_along_axis(logits, labels[:, None], axis=1)  # [M, 1]
  lower_index = np.arange(logits.shape[1])[None, :] < labels[:, None]  # [M, C]
  return np.sum((logits > own) | ((logits == own) & lower_index), axis=1).astype(np.int64)


class ZeroShotEvaluator:
  """Zero-shot classification of a labelled image split by prompt-ensembled class embeddings.

  Runs on every process with the same host data; the encode functions take host numpy batches.
  """

  def __init__(
    self,
    name: str,
    encode_image_fn: Callable[[Any, np.ndarray], Any],
    encode_text_fn: Callable[[Any, np.ndarray, np.ndarray], Any],
    tokenizer: Tokenizer,
    zeroshot_data: dict[str, Any],
    batch_size: int,
    every_steps: int,
    max_len: int,
  ):
    """Builds the evaluator.

    Args:
      name: the evaluator's name (metrics are logged as `eval/<name>/<metric>`).
      encode_image_fn: `(params, images [B, H, W, 3]) -> [B, E]`.
      encode_text_fn: `(params, ids [B, L], mask [B, L]) -> [B, E]`.
      tokenizer: has `encode_batch(texts, max_len) -> (ids, mask)`.
      zeroshot_data: `images [M, H, W, 3]`, `labels [M]` int, `class_names` list of `C` str,
        `templates` list of str with one `{}` each (see `vlalign.data.pipeline.make_zeroshot_data`).
      batch_size: rows per encode call (the last batch is padded).
      every_steps: run every this many train steps; 0 = only at the end of training.
      max_len: token length of the prompts.
    """
    self.name = name
    self.every_steps = int(every_steps)
    self.batch_size = int(batch_size)
    self.max_len = int(max_len)
    self._encode_image = encode_image_fn
    self._encode_text = encode_text_fn
    self._tokenizer = tokenizer
    self.images = np.asarray(zeroshot_data["images"])
    self.labels = np.asarray(zeroshot_data["labels"])
    self.class_names = list(zeroshot_data["class_names"])
    self.templates = list(zeroshot_data["templates"])
    prompts(self.class_names, self.templates)  # Validates the templates now rather than at run.
    if self.labels.shape != (len(self.images),):
      raise ValueError(f"labels {self.labels.shape} do not match {len(self.images)} images")
    if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
      raise ValueError(f"labels must lie in [0, {len(self.class_names)})")

  def run(self, params: Any, step: int | None = None) -> dict[str, float]:
    """Returns `{"acc": top-1 accuracy, "chance": 100 / C}` in percent."""
    del step  # Writes no files named by the step.
    class_emb = _class_embeddings_of(self, params)
    image_emb = embed_in_batches(self._encode_image, params, (self.images,), self.batch_size)
    return {
      "acc": top1_accuracy(image_emb, class_emb, self.labels),
      "chance": 100.0 / len(self.class_names),
    }


class StreamingZeroShotEvaluator:
  """Zero-shot classification of labelled images on disk, decoded one batch at a time.

  The images are decoded by `pipeline.ImageRows` (a thread pool) batch by batch, embedded, scored
  against the class embeddings and reduced to each image's label rank, so host memory holds one
  batch of pixels and `N` ranks whatever the dataset's size.

  Unreadable images (missing, truncated, undecodable: `images.UnreadableImageError`, or an OSError
  reading them) do not stop the run: they are fed to the encoder as black images to keep the batch
  shape, then DROPPED from the metrics, which are over the readable images only; their number is
  the `skipped_images` metric (and the first few are logged as warnings).

  Several processes (`sharding.host_fn` encode functions): each process decodes only the images
  its devices hold (`embed_in_batches`), every process gets every image's scores, and the
  unreadable images are merged over the processes, so every process returns the same metrics.
  """

  def __init__(
    self,
    name: str,
    encode_image_fn: Callable[[Any, np.ndarray], Any],
    encode_text_fn: Callable[[Any, np.ndarray, np.ndarray], Any],
    tokenizer: Tokenizer,
    source: Any,
    templates: Sequence[str],
    *,
    image_size: int,
    batch_size: int,
    every_steps: int,
    max_len: int,
    resize: str = "center_crop",
    decoder: str = "pil",
    num_threads: int = 8,
  ):
    """Builds the evaluator.

    Args:
      name: the evaluator's name (metrics are logged as `eval/<name>/<metric>`).
      encode_image_fn: `(params, images [B, S, S, 3]) -> [B, E]`.
      encode_text_fn: `(params, ids [B, L], mask [B, L]) -> [B, E]`.
      tokenizer: has `encode_batch(texts, max_len) -> (ids, mask)`.
      source: a `vlalign.data.folder.LabelledImages` (`class_names`, `len`, `labels(indices)`,
        `image(index, size, resize, decoder)`).
      templates: prompt templates with one `{}` each.
      image_size: S, the side of the decoded images.
      batch_size: images (and prompts) per encode call (the last batch is padded).
      every_steps: run every this many train steps; 0 = only at the end of training.
      max_len: token length of the prompts.
      resize: `vlalign.data.images.RESIZE_MODES`; "center_crop" is CLIP's evaluation transform.
      decoder: `"pil"` or `"simplejpeg"` (`vlalign.data.images`).
      num_threads: decoding threads (0 = decode in the calling thread).
    """
    from vlalign.data import pipeline  # Imported here: evaluators need no data code until built.

    self.name = name
    self.every_steps = int(every_steps)
    self.batch_size = int(batch_size)
    self.max_len = int(max_len)
    self.image_size = int(image_size)
    self.resize = resize
    self.decoder = decoder
    self._encode_image = encode_image_fn
    self._encode_text = encode_text_fn
    self._tokenizer = tokenizer
    self.source = source
    self.class_names = list(source.class_names)
    self.templates = list(templates)
    prompts(self.class_names, self.templates)  # Validates the templates now rather than at run.
    self._images = pipeline.BlackIfUnreadable(self._load, self.image_size, f"zeroshot {name}")
    self.rows = pipeline.ImageRows(self._images, len(source), int(num_threads))

  def _load(self, index: int) -> np.ndarray:
    """uint8 `[S, S, 3]` of image `index`."""
    return self.source.image(index, self.image_size, self.resize, self.decoder)

  def run(self, params: Any, step: int | None = None) -> dict[str, float]:
    """`acc` (top-1), `acc5` (top-5, only with more than 5 classes), `chance` (`100 / C`) in
    percent over the readable images, and `skipped_images` (their complement); the accuracies are
    NaN when no image was readable or a score is not finite."""
    del step  # Writes no files named by the step.
    class_emb = _class_embeddings_of(self, params)
    num_images = len(self.rows)
    self._images.skipped.clear()
    ranks = np.zeros(num_images, np.int64)
    finite = np.ones(num_images, bool)  # whether each image's scores are finite
    for start in range(0, num_images, self.batch_size):
      rows = np.arange(start, min(start + self.batch_size, num_images))
      image_emb = embed_in_batches(
        self._encode_image, params, (self.rows,), self.batch_size, rows=rows
      )
      logits = image_emb @ class_emb.T  # [b, C]
      finite[rows] = np.all(np.isfinite(logits), axis=1)
      ranks[rows] = label_ranks(logits, self.source.labels(rows))
    skipped = union_over_processes(sorted(self._images.skipped))  # Each decoded its own rows.
    readable = np.ones(num_images, bool)
    readable[skipped] = False
    return accuracy_metrics(
      ranks[readable], len(self.class_names), bool(np.all(finite[readable]))
    ) | {"skipped_images": float(len(skipped))}


def _class_embeddings_of(evaluator: Any, params: Any) -> np.ndarray:
  """`class_embeddings` of a zero-shot evaluator's classes and templates."""
  return class_embeddings(
    evaluator._encode_text,
    params,
    evaluator._tokenizer,
    evaluator.class_names,
    evaluator.templates,
    evaluator.max_len,
    evaluator.batch_size,
  )


def accuracy_metrics(ranks: np.ndarray, num_classes: int, finite: bool = True) -> dict[str, float]:
  """`acc` (top-1), `acc5` (top-5, only when `num_classes > 5`: else it is 100 by construction) and
  `chance` (`100 / num_classes`), in percent, from label ranks (`label_ranks`); the accuracies
  are NaN when there is no rank or the scores were not `finite`."""
  ks = {"acc": 1, **({"acc5": 5} if num_classes > 5 else {})}
  valid = finite and len(ranks) > 0
  metrics = {
    key: float(100.0 * np.mean(ranks < k)) if valid else float("nan") for key, k in ks.items()
  }
  return metrics | {"chance": 100.0 / num_classes}


# `dataset` fields of the evaluator (with their defaults); the others describe the source.
_DATASET_DEFAULTS = {
  "templates": "clip",
  "resize": "center_crop",
  "decoder": "pil",
  "num_threads": 8,
}


@EVALUATORS.register("zeroshot")
def build_zeroshot(name: str, settings: dict, ctx: EvalContext) -> Any:
  """Builder for `type: "zeroshot"`: fields `split` + `task` (the shapes dataset) or `dataset`
  (labelled images on disk, see `build_streaming`), and `max_len` (of the prompts; default
  `data.eval_max_len`, itself defaulting to `data.max_len`), `every_steps`, `batch_size`."""
  if "dataset" in settings:
    return build_streaming(name, settings, ctx)
  check_keys(name, settings, {"split", "task"}, {"max_len"})
  from vlalign.data import pipeline

  encode_image = ctx.predict_fn("encode_image", name, "zeroshot")
  encode_text = ctx.predict_fn("encode_text", name, "zeroshot")
  pipeline.split_size(ctx.data_config, settings["split"])
  if ctx.check_only:
    return None
  return ZeroShotEvaluator(
    name,
    encode_image,
    encode_text,
    ctx.tokenizer,
    pipeline.make_zeroshot_data(ctx.data_config, settings["split"], settings["task"]),
    batch_size=settings.get("batch_size", ctx.default_batch_size),
    every_steps=settings.get("every_steps", 0),
    max_len=settings.get("max_len", pipeline.eval_text_len(ctx.data_config)),
  )


def _dataset_options(spec: dict) -> dict:
  """Pops the evaluator's own `dataset` fields (`_DATASET_DEFAULTS`) off `spec`, checked, with
  the defaults for absent or None ones."""
  from vlalign.data import folder, images

  options = {key: spec.pop(key, None) for key in _DATASET_DEFAULTS}
  options = {k: _DATASET_DEFAULTS[k] if v is None else v for k, v in options.items()}
  options["templates"] = folder.text_list(options["templates"], "templates")
  if options["resize"] not in images.RESIZE_MODES:
    raise ConfigError(f"resize {options['resize']!r}; choose one of {images.RESIZE_MODES}")
  if options["decoder"] not in images.DECODERS:
    raise ConfigError(f"decoder {options['decoder']!r}; choose one of {images.DECODERS}")
  threads = options["num_threads"]
  if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
    raise ConfigError(f"num_threads must be an int >= 0; got {threads!r}")
  return options


def build_streaming(
  name: str, settings: dict, ctx: EvalContext
) -> StreamingZeroShotEvaluator | None:
  """The `zeroshot` evaluator of a `dataset` on disk.

  `settings["dataset"]`: a `vlalign.data.folder` source spec (`format="image_folder"` with `root`,
  or `format="tfds"` with `builder_dir` or `name` + `data_dir`, `split`, `image_key`, `label_key`;
  both with `classnames` and `max_examples`) plus `templates` ("clip", a file or a list; default
  "clip"), `resize` (default "center_crop"), `decoder` (default "pil") and `num_threads` (decoding
  threads, default 8). Images are decoded at `data.image_size`. With `ctx.check_only` the paths,
  fields, class names and templates are checked (the folder tree is listed) and no image is read.
  """
  from vlalign.data import folder, pipeline

  if "split" in settings or "task" in settings:
    raise ConfigError(
      f"evaluator {name!r} sets both dataset and split/task: give either dataset (labelled "
      "images on disk) or split + task (the shapes dataset)"
    )
  check_keys(name, settings, {"dataset"}, {"max_len"})
  raw = settings["dataset"]
  if not hasattr(raw, "keys"):
    raise ConfigError(f"evaluator {name!r}: dataset must be a dict; got {raw!r}")
  spec = dict(raw.to_dict() if hasattr(raw, "to_dict") else raw)
  try:
    options = _dataset_options(spec)
    source = folder.make_source(spec)  # Lists the images; reads none.
    prompts(source.class_names, options["templates"])
  except (ConfigError, FileNotFoundError) as err:
    raise type(err)(f"evaluator {name!r} dataset: {err}") from None
  encode_image = ctx.predict_fn("encode_image", name, "zeroshot")
  encode_text = ctx.predict_fn("encode_text", name, "zeroshot")
  if ctx.check_only:
    return None
  return StreamingZeroShotEvaluator(
    name,
    encode_image,
    encode_text,
    ctx.tokenizer,
    source,
    options["templates"],
    image_size=int(ctx.data_config["image_size"]),
    batch_size=settings.get("batch_size", ctx.default_batch_size),
    every_steps=settings.get("every_steps", 0),
    max_len=settings.get("max_len", pipeline.eval_text_len(ctx.data_config)),
    resize=options["resize"],
    decoder=options["decoder"],
    num_threads=options["num_threads"],
  )
