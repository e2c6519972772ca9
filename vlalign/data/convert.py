r"""Converts an image-text dataset on disk into a TFDS dataset of ArrayRecord shards.

  python -m vlalign.data.convert --format=albef_json --ann=coco_train.json \
    --image_root=/data/coco --out_dir=/data/tfds --name=coco_albef --split=train \
    [--max_shorter_side=384] [--examples_per_shard=10000] [--num_workers=8]

  python -m vlalign.data.convert --out_dir=/data/tfds --name=cc3m --max_shorter_side=256 \
    --source='{"format": "webdataset", "shards": "cc3m/{00000..00331}.tar"}'

The input is any source spec of `vlalign.data.files` (`albef_json`, `karpathy`, `webdataset`,
`tfds`), given as JSON with `--source` or with the shorthand flags `--format`, `--ann`
(comma-separated), `--image_root`, `--shards` (comma-separated), `--split_name` (karpathy's split
names, comma-separated; required for karpathy) and `--max_examples`. No TensorFlow and no network
are needed.

Output (`B = <out_dir>/<name>/1.0.0`, a TFDS builder directory):

* `B/<name>-<split>.array_record-0000i-of-0000S`: the shards, one per `--examples_per_shard`
  source examples (a shard holds fewer when examples are skipped, possibly none), examples in
  source order. Features: `image` (the encoded image: the source's bytes unchanged, or with
  `--max_shorter_side=N` a JPEG whose shorter side is at most N, see `images.downscale_jpeg`;
  read back as `bytes`), `captions` (the example's non-empty captions, a sequence of text) and
  `image_id` (int64, the source's image id).
* `B/dataset_info.json`, `B/features.json`: written when a split's last shard is done (a split
  converted later into the same directory is added to them).
* `B/convert/<split>.json`: the arguments (source spec with absolute paths, split, resizing,
  examples per shard, number of source examples) and, once done, the result: examples written,
  skipped (no caption, unreadable image) and the first skip reasons.
* `B/convert/<split>/0000i.json`: one per finished shard (its examples, sizes and skips).

Read it back with `vlalign.data.files` (`dict(format="tfds", builder_dir=B, split=...)`, or
`dict(format="tfds", name=<name>, data_dir=<out_dir>, split=...)`), with
`tfds.builder_from_directory(B).as_data_source(split=...)`, or with
`tfds.data_source(<name>, data_dir=<out_dir>, split=...)`. The last two work without a registered
builder because the name is not one of TFDS's registered datasets (names that are, such as
`coco_captions`, are refused: TFDS would run that dataset's own code).

Resuming: each shard is written under a temporary name, synced and renamed, then its JSON record
is written; a shard counts as done when both exist and the file has the recorded size. Rerunning
the same command after an interruption converts only the shards that are not done and gives
output identical to an uninterrupted run (shards, records and metadata, byte for byte). A rerun
with other arguments (or a source of another size) into the same split is an error naming what
differs; a rerun of a finished split writes no shard (only the metadata again). One conversion
at a time per builder directory (an `flock`, released however the process dies).

Skipped examples (no non-empty caption; an image that is missing, truncated or not decodable)
are counted, not written. A progress line (done/total, rate, ETA, skipped) is logged every
`--log_every_s` seconds and after each shard.
"""

import collections
import dataclasses
import fcntl
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any

import numpy as np
from absl import flags, logging

from vlalign import cli, workdir
from vlalign.data import files, images
from vlalign.errors import ConfigError, PathError, WorkdirError

VERSION = "1.0.0"
CONVERTER_VERSION = 1  # Recorded with the arguments; bump when the output of a shard changes.
FILE_SUFFIX = "array_record"
FIRST_SKIPS = 10  # Skip reasons kept in the result (all of them stay in the shard records).
_CHECK_SIZE = 8  # Side decoded to check an image kept as it is (JPEGs decode at 1/8 scale).
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_SPLIT = re.compile(r"[A-Za-z0-9_]+")
_PATH_KEYS = ("ann", "image_root", "shards", "builder_dir", "data_dir")
_SHORTHAND = ("format", "ann", "image_root", "shards", "split_name", "max_examples")
_SHORTHAND_FOR = {  # Shorthand flags that apply to each format (besides format, max_examples).
  "albef_json": ("ann", "image_root"),
  "karpathy": ("ann", "image_root", "split_name"),
  "webdataset": ("shards",),
  "tfds": (),
}
NO_CAPTION = "no_caption"
UNREADABLE = "unreadable_image"


@dataclasses.dataclass(frozen=True)
class Options:
  """What is written: the split's name, the image bytes (`max_shorter_side` 0 = unchanged;
  `jpeg_quality` of re-encoded images) and the number of source examples per shard."""

  split: str = "train"
  max_shorter_side: int = 0
  jpeg_quality: int = 95
  examples_per_shard: int = 10000


@dataclasses.dataclass(frozen=True)
class Result:
  """Where a conversion stands: `complete` once every shard and the metadata are written."""

  builder_dir: str
  split: str
  complete: bool
  source_examples: int
  examples: int  # written, in the finished shards
  skipped: int  # in the finished shards
  first_skips: tuple[str, ...]
  shards_done: int
  num_shards: int


# --- Pure parts ---------------------------------------------------------------------------------


def check_name(name: str) -> None:
  """ConfigError unless `name` is a snake_case TFDS name that no registered TFDS dataset has."""
  if not name or not _NAME.fullmatch(name):
    raise ConfigError(
      f"--name {name!r} is not a valid dataset name: lower-case letters, digits and '_', "
      "starting with a letter (e.g. coco_albef)"
    )
  import tensorflow_datasets as tfds  # Heavy: imported when needed.

  try:
    tfds.builder_cls(name)
  except tfds.core.DatasetNotFoundError:
    return
  raise ConfigError(
    f"--name {name!r} is a dataset registered in TFDS, whose loader would run that dataset's own "
    f"code (TensorFlow, downloads) instead of reading these files; choose another name, e.g. "
    f"{name}_vl"
  )


def check_options(options: Options) -> None:
  """ConfigError for a split name or number out of range."""
  if not _SPLIT.fullmatch(options.split or ""):
    raise ConfigError(f"--split {options.split!r}: use letters, digits and '_' (e.g. train)")
  if options.max_shorter_side < 0:
    raise ConfigError(f"--max_shorter_side must be >= 0 (0 = keep), got {options.max_shorter_side}")
  if not 1 <= options.jpeg_quality <= 100:
    raise ConfigError(f"--jpeg_quality must be in 1..100, got {options.jpeg_quality}")
  if options.examples_per_shard < 1:
    raise ConfigError(f"--examples_per_shard must be >= 1, got {options.examples_per_shard}")


def _split_list(value: str) -> str | list[str]:
  """`"a,b"` -> `["a", "b"]`; a single item stays a string."""
  items = [v.strip() for v in value.split(",") if v.strip()]
  return items[0] if len(items) == 1 else items


def spec_from_flags(source: str | None, shorthand: dict[str, Any]) -> dict:
  """The source spec of `--source` (JSON) or of the shorthand flags (the others being None).

  Args:
    source: `--source`, a JSON object, or None.
    shorthand: `{flag: value}` of `format`, `ann`, `image_root`, `shards`, `split_name`,
      `max_examples` (None = not given).

  Returns:
    A spec dict for `files.make_source`.
  """
  given = {k: v for k, v in shorthand.items() if v is not None}
  if source is not None:
    if given:
      names = ", ".join(f"--{k}" for k in sorted(given))
      raise ConfigError(f"give the source either as --source or with {names}, not both")
    try:
      spec = json.loads(source)
    except json.JSONDecodeError as e:
      raise ConfigError(f"--source is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
      raise ConfigError(f"--source must be a JSON object with a format field, got {source!r}")
    return spec
  fmt = given.pop("format", None)
  if fmt is None:
    raise ConfigError("give the source: --source='{\"format\": ...}' or --format and its flags")
  if fmt not in _SHORTHAND_FOR:
    raise ConfigError(f"unknown --format {fmt!r}; available: {sorted(_SHORTHAND_FOR)}")
  allowed = set(_SHORTHAND_FOR[fmt]) | {"max_examples"}
  extra = sorted(set(given) - allowed)
  if extra:
    raise ConfigError(f"--{extra[0]} does not apply to --format={fmt}")
  if fmt == "karpathy" and "split_name" not in given:
    raise ConfigError("--format=karpathy needs --split_name (e.g. train,restval or test)")
  spec: dict[str, Any] = {"format": fmt}
  for key, value in given.items():
    field = "split" if key == "split_name" else key
    spec[field] = _split_list(value) if isinstance(value, str) and key != "image_root" else value
  return spec


def _absolute(value: Any) -> Any:
  if isinstance(value, list | tuple):
    return [_absolute(v) for v in value]
  if isinstance(value, str | os.PathLike) and not workdir.is_uri(value):
    return os.path.abspath(value)
  return value


def absolute_spec(spec: dict) -> dict:
  """`spec` with its local paths (ann, image_root, shards, builder_dir, data_dir) absolute."""
  return {k: _absolute(v) if k in _PATH_KEYS else v for k, v in spec.items()}


def arguments(spec: dict, options: Options, source_examples: int) -> dict:
  """What determines the output of a split: recorded at its start, compared on every rerun."""
  return {
    "converter_version": CONVERTER_VERSION,
    "source": spec,
    "source_examples": int(source_examples),
    "split": options.split,
    "max_shorter_side": options.max_shorter_side,
    # Only re-encoded images depend on the quality.
    "jpeg_quality": options.jpeg_quality if options.max_shorter_side else None,
    "examples_per_shard": options.examples_per_shard,
  }


def differences(recorded: dict, current: dict) -> list[str]:
  """`key: recorded -> current` for each differing field (`source.<key>` inside the spec)."""
  out = []
  for key in sorted(set(recorded) | set(current)):
    old, new = recorded.get(key), current.get(key)
    if isinstance(old, dict) and isinstance(new, dict):
      out += [f"{key}.{d}" for d in differences(old, new)]
    elif old != new:
      out.append(f"{key}: {old!r} -> {new!r}")
  return out


def shard_ranges(num_examples: int, per_shard: int) -> list[range]:
  """The source indices of each shard: `[0, E), [E, 2E), ...` (the last one shorter)."""
  return [range(s, min(s + per_shard, num_examples)) for s in range(0, num_examples, per_shard)]


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(label: str, done: int, total: int, skipped: int, rate: float) -> str:
  """`label: done/total examples (pct), skipped K, R examples/s, ETA ...`."""
  eta = (total - done) / rate if rate > 0 else float("inf")
  pct = 100.0 * done / max(total, 1)
  return (
    f"{label}: {done:,}/{total:,} examples ({pct:.1f}%), skipped {skipped:,}, "
    f"{rate:,.1f} examples/s, ETA {format_duration(eta)}"
  )


class Progress:
  """Logs `progress_line` at most every `every_s` seconds; the rate counts this run's work only."""

  def __init__(
    self,
    label: str,
    total: int,
    done: int,
    skipped: int,
    every_s: float,
    clock: Callable[[], float] = time.monotonic,
  ):
    self.label, self.total, self.every_s, self.clock = label, total, every_s, clock
    self.done, self.skipped, self.start_done = done, skipped, done
    self.start = self.last = clock()

  def rate(self) -> float:
    return (self.done - self.start_done) / max(self.clock() - self.start, 1e-9)

  def line(self) -> str:
    return progress_line(self.label, self.done, self.total, self.skipped, self.rate())

  def log(self, note: str = "") -> None:
    self.last = self.clock()
    logging.info("%s%s", self.line(), f"; {note}" if note else "")

  def add(self, examples: int, skipped: int) -> None:
    self.done += examples
    self.skipped += skipped
    if self.clock() - self.last >= self.every_s:
      self.log()


# --- Examples -----------------------------------------------------------------------------------


def features():
  """The FeaturesDict of the converted datasets."""
  import tensorflow_datasets as tfds  # Heavy: imported when needed.

  return tfds.features.FeaturesDict(
    {
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes, kept as such
      "captions": tfds.features.Sequence(tfds.features.Text()),
      "image_id": tfds.features.Scalar(dtype=np.int64),
    }
  )


def image_bytes(data: bytes, max_shorter_side: int, quality: int) -> bytes:
  """The bytes to store: `data` itself (checked to decode) or `downscale_jpeg`'s JPEG.

  Raises:
    images.UnreadableImageError: bytes that do not decode.
  """
  if max_shorter_side:
    return images.downscale_jpeg(data, max_shorter_side, quality)
  images.decode_image(data, _CHECK_SIZE)
  return data


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One source example, serialized (`record`), or why it was skipped (`kind`, `reason`)."""

  index: int
  record: bytes | None
  kind: str | None = None
  reason: str | None = None


class Encoder:
  """Source example -> serialized TFDS example (thread-safe: no state changes after init)."""

  def __init__(self, source: files.CaptionedImages, options: Options):
    from tensorflow_datasets.core import example_serializer

    self.source, self.options = source, options
    self.features = features()
    self.serializer = example_serializer.ExampleSerializer(self.features.get_serialized_info())

  def __call__(self, index: int) -> Encoded:
    captions = self.source.captions_of(index)
    if not captions:
      return Encoded(index, None, NO_CAPTION, "no non-empty caption")
    try:
      data = self.source.encoded_image(index)
      data = image_bytes(data, self.options.max_shorter_side, self.options.jpeg_quality)
    except (images.UnreadableImageError, OSError) as e:
      return Encoded(index, None, UNREADABLE, str(e))
    example = {
      "image": data,
      "captions": list(captions),
      "image_id": int(self.source.image_ids[index]),
    }
    proto = self.serializer.get_tf_example(self.features.encode_example(example))
    # Sorted feature keys: the default order follows string hashes, which differ between
    # processes, and a resumed conversion must write the same bytes.
    return Encoded(index, proto.SerializeToString(deterministic=True))


def ordered_map(fn: Callable[[int], Any], items: Iterable[int], workers: int) -> Iterator[Any]:
  """`map(fn, items)` in order, on `workers` threads (at most `4 * workers` items in flight)."""
  if workers <= 1:
    yield from map(fn, items)
    return
  with futures.ThreadPoolExecutor(workers) as pool:
    pending: collections.deque = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= 4 * workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


# --- Files --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
  """The paths of one split of a builder directory."""

  builder_dir: str
  name: str
  split: str
  num_shards: int

  def template(self):
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import naming

    return tfds.core.ShardedFileTemplate(
      data_dir=tfds.core.Path(self.builder_dir),
      template=naming.DEFAULT_FILENAME_TEMPLATE,
      dataset_name=self.name,
      split=self.split,
      filetype_suffix=FILE_SUFFIX,
    )

  def shard(self, index: int) -> str:
    """`<name>-<split>.array_record-<index>-of-<num_shards>` (TFDS's default file names)."""
    return os.path.join(
      self.builder_dir,
      f"{self.name}-{self.split}.{FILE_SUFFIX}-{index:05d}-of-{self.num_shards:05d}",
    )

  def record(self, index: int) -> str:
    return os.path.join(self.builder_dir, "convert", self.split, f"{index:05d}.json")

  @property
  def arguments(self) -> str:
    return os.path.join(self.builder_dir, "convert", f"{self.split}.json")


def _dumps(data: Any) -> str:
  return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def shard_done(layout: Layout, index: int) -> dict | None:
  """The record of a finished shard, or None if it has to be (re)written."""
  record = _read_json(layout.record(index))
  path = layout.shard(index)
  if not isinstance(record, dict) or not os.path.exists(path):
    return None
  return record if os.path.getsize(path) == record.get("file_bytes") else None


def _sync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_shard(layout: Layout, index: int, encoded: Iterable[Encoded], progress: Progress) -> dict:
  """Writes shard `index` from its encoded examples (temporary file, sync, rename, then its
  record) and returns the record."""
  from array_record.python import array_record_module

  path = layout.shard(index)
  tmp = path + ".incomplete"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  examples, example_bytes, skipped = 0, 0, []
  try:
    for item in encoded:
      if item.record is None:
        skipped.append([item.index, item.kind, item.reason])
      else:
        writer.write(item.record)
        examples += 1
        example_bytes += len(item.record)
      progress.add(1, int(item.record is None))
  finally:
    writer.close()
  _sync(tmp)
  os.replace(tmp, path)
  record = {
    "examples": examples,
    "example_bytes": example_bytes,
    "file_bytes": os.path.getsize(path),
    "skipped": skipped,
  }
  workdir.write_text(workdir.as_path(layout.record(index)), _dumps(record))
  return record


def summarize(records: list[dict]) -> dict:
  """A split's result from its shard records."""
  skips = [s for r in records for s in r["skipped"]]
  return {
    "examples": sum(r["examples"] for r in records),
    "example_bytes": sum(r["example_bytes"] for r in records),
    "shard_lengths": [r["examples"] for r in records],
    "skipped": len(skips),
    "skipped_no_caption": sum(kind == NO_CAPTION for _, kind, _ in skips),
    "skipped_unreadable_image": sum(kind == UNREADABLE for _, kind, _ in skips),
    "first_skips": [f"example {i}: {reason}" for i, _, reason in skips[:FIRST_SKIPS]],
  }


def write_dataset_info(builder_dir: str, name: str) -> None:
  """`dataset_info.json` and `features.json` for every finished split of `builder_dir`."""
  import tensorflow_datasets as tfds

  split_infos = []
  convert_dir = os.path.join(builder_dir, "convert")
  for entry in sorted(os.listdir(convert_dir)):
    state = _read_json(os.path.join(convert_dir, entry)) if entry.endswith(".json") else None
    if not isinstance(state, dict) or "result" not in state:
      continue
    split, result = state["arguments"]["split"], state["result"]
    layout = Layout(builder_dir, name, split, len(result["shard_lengths"]))
    split_infos.append(
      tfds.core.SplitInfo(
        name=split,
        shard_lengths=result["shard_lengths"],
        num_bytes=result["example_bytes"],
        filename_template=layout.template(),
      )
    )
  identity = tfds.core.DatasetIdentity(
    name=name, version=tfds.core.Version(VERSION), data_dir=builder_dir, module_name=""
  )
  info = tfds.core.DatasetInfo(
    builder=identity,
    features=features(),
    description=(
      "Image-text pairs converted by `python -m vlalign.data.convert`; each split's source, "
      "arguments and skipped examples are in convert/<split>.json."
    ),
  )
  info.set_file_format(tfds.core.FileFormat.ARRAY_RECORD)
  info.set_splits(tfds.core.SplitDict(split_infos))
  info.write_to_directory(builder_dir)


class _Lock:
  """An exclusive `flock` on `<builder_dir>/convert/.lock`, released however the process ends."""

  def __init__(self, builder_dir: str):
    self.path = os.path.join(builder_dir, "convert", ".lock")
    self.fd = None

  def __enter__(self) -> "_Lock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self.fd)
      raise WorkdirError(
        f"{os.path.dirname(os.path.dirname(self.path))} is being converted by another process; "
        "wait for it to finish"
      ) from None
    return self

  def __exit__(self, *exc) -> None:
    fcntl.flock(self.fd, fcntl.LOCK_UN)
    os.close(self.fd)


def _record_arguments(layout: Layout, args: dict) -> None:
  """Writes the arguments of a new split; ConfigError if a started split has other ones."""
  state = _read_json(layout.arguments)
  if state is None:
    workdir.write_text(workdir.as_path(layout.arguments), _dumps({"arguments": args}))
    return
  diff = differences(state.get("arguments", {}), args)
  if diff:
    raise ConfigError(
      f"{layout.builder_dir} already holds split {layout.split!r} converted with other arguments "
      f"({'; '.join(diff)}). Rerun with the same arguments to resume it, or write to another "
      f"--out_dir, --name or --split (or delete the split's shards and convert/{layout.split}.json "
      f"and convert/{layout.split}/ there to start it over)"
    )


# --- Conversion ---------------------------------------------------------------------------------


def convert(
  spec: dict,
  out_dir: str,
  name: str,
  options: Options = Options(),
  *,
  num_workers: int = 1,
  log_every_s: float = 10.0,
  stop_after_shards: int | None = None,
) -> Result:
  """Converts `spec`'s examples into split `options.split` of `<out_dir>/<name>/1.0.0`.

  Args:
    spec: a `vlalign.data.files` source spec.
    out_dir: the TFDS data_dir (a local directory; created).
    name: the dataset name.
    options: what is written.
    num_workers: threads reading and encoding images (1 = none).
    log_every_s: seconds between progress lines.
    stop_after_shards: stop after writing this many shards in this call (tests: an
      interruption); the result is then incomplete unless no shard was left.

  Returns:
    The state of the split after this call.

  Raises:
    ConfigError: bad arguments, or other arguments than those the split was started with.
    PathError: a missing input, or a source none of whose examples could be converted.
    WorkdirError: another conversion holds the builder directory.
  """
  check_name(name)
  check_options(options)
  if workdir.is_uri(out_dir):
    raise ConfigError(f"--out_dir {out_dir}: write to a local directory (then copy it)")
  spec = absolute_spec(dict(spec.to_dict() if hasattr(spec, "to_dict") else spec))
  source = files.make_source(spec, files.ImageOptions(size=_CHECK_SIZE))
  ranges = shard_ranges(len(source), options.examples_per_shard)
  builder_dir = os.path.join(os.path.abspath(out_dir), name, VERSION)
  layout = Layout(builder_dir, name, options.split, len(ranges))
  label = f"{name}[{options.split}]"
  with _Lock(builder_dir):
    _record_arguments(layout, arguments(spec, options, len(source)))
    records = [shard_done(layout, i) for i in range(len(ranges))]
    todo = [i for i, r in enumerate(records) if r is None]
    done = sum(len(ranges[i]) for i, r in enumerate(records) if r is not None)
    skipped = sum(len(r["skipped"]) for r in records if r is not None)
    logging.info(
      "%s: converting %s into %s: %d shards of %d examples, %d already done",
      label,
      source,
      builder_dir,
      len(ranges),
      options.examples_per_shard,
      len(ranges) - len(todo),
    )
    progress = Progress(label, len(source), done, skipped, log_every_s)
    encoder = Encoder(source, options)
    for count, index in enumerate(todo):
      if stop_after_shards is not None and count >= stop_after_shards:
        break
      encoded = ordered_map(encoder, ranges[index], num_workers)
      records[index] = write_shard(layout, index, encoded, progress)
      progress.log(f"shard {index + 1}/{len(ranges)} written")
    finished = [r for r in records if r is not None]
    result = summarize(finished)
    complete = len(finished) == len(ranges)
    if complete:
      if not result["examples"]:
        raise PathError(
          f"none of the {len(source)} examples of {source} could be converted; first reasons: "
          f"{result['first_skips'][:3]}"
        )
      state = {"arguments": arguments(spec, options, len(source)), "result": result}
      workdir.write_text(workdir.as_path(layout.arguments), _dumps(state))
      write_dataset_info(builder_dir, name)
  return Result(
    builder_dir=builder_dir,
    split=options.split,
    complete=complete,
    source_examples=len(source),
    examples=result["examples"],
    skipped=result["skipped"],
    first_skips=tuple(result["first_skips"]),
    shards_done=len(finished),
    num_shards=len(ranges),
  )


# --- Binary -------------------------------------------------------------------------------------

_SOURCE = flags.DEFINE_string("source", None, "The source spec as JSON (see vlalign.data.files).")
_FORMAT = flags.DEFINE_string("format", None, f"Shorthand: the source format {files.FORMATS}.")
_ANN = flags.DEFINE_string("ann", None, "Shorthand: annotation file(s), comma-separated.")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "Shorthand: the images' root directory.")
_SHARDS = flags.DEFINE_string(
  "shards", None, "Shorthand: webdataset tar shards (glob, {a..b}, ',')."
)
_SPLIT_NAME = flags.DEFINE_string(
  "split_name", None, "Shorthand: karpathy split(s), e.g. train,restval."
)
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", None, "Shorthand: the first N examples only.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "The TFDS data_dir written (local).")
_NAME_FLAG = flags.DEFINE_string("name", None, "The dataset name (snake_case, e.g. coco_albef).")
_SPLIT_FLAG = flags.DEFINE_string("split", "train", "The TFDS split written.")
_MAX_SHORTER_SIDE = flags.DEFINE_integer(
  "max_shorter_side", 0, "0: keep the image bytes; N: JPEGs with shorter side <= N."
)
_EXAMPLES_PER_SHARD = flags.DEFINE_integer(
  "examples_per_shard", 10000, "Source examples per shard."
)
_JPEG_QUALITY = flags.DEFINE_integer("jpeg_quality", 95, "Quality of re-encoded JPEGs.")
_NUM_WORKERS = flags.DEFINE_integer(
  "num_workers", min(8, os.cpu_count() or 1), "Threads reading and encoding images."
)
_LOG_EVERY_S = flags.DEFINE_float("log_every_s", 10.0, "Seconds between progress lines.")


def main(argv):
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments: {argv[1:]}")
  for flag in ("out_dir", "name"):
    if not flags.FLAGS[flag].value:
      raise ConfigError(f"--{flag} is required")
  shorthand = {
    "format": _FORMAT.value,
    "ann": _ANN.value,
    "image_root": _IMAGE_ROOT.value,
    "shards": _SHARDS.value,
    "split_name": _SPLIT_NAME.value,
    "max_examples": _MAX_EXAMPLES.value,
  }
  spec = spec_from_flags(_SOURCE.value, shorthand)
  options = Options(
    split=_SPLIT_FLAG.value,
    max_shorter_side=_MAX_SHORTER_SIDE.value,
    jpeg_quality=_JPEG_QUALITY.value,
    examples_per_shard=_EXAMPLES_PER_SHARD.value,
  )
  result = convert(
    spec,
    _OUT_DIR.value,
    _NAME_FLAG.value,
    options,
    num_workers=_NUM_WORKERS.value,
    log_every_s=_LOG_EVERY_S.value,
  )
  print(
    f"wrote {result.examples} of {result.source_examples} examples to {result.builder_dir} "
    f"(split {result.split!r}, {result.num_shards} shards); skipped {result.skipped}"
  )
  for reason in result.first_skips:
    print(f"  skipped {reason}")
  print(
    f"read it with dict(format='tfds', builder_dir='{result.builder_dir}', "
    f"split='{result.split}') or tfds.data_source('{_NAME_FLAG.value}', "
    f"data_dir='{os.path.abspath(_OUT_DIR.value)}', split='{result.split}')"
  )


if __name__ == "__main__":
  cli.run(main)
