"""The embedded synthetic dataset: rendered coloured shapes with exact captions and masks.

Nothing is downloaded. Example `i` of a split is rendered from
`np.random.default_rng([seed, split_id, i])`, so random access is O(1) and every process and run
sees the same pixels and captions.

Each image (`[S, S, 3]` uint8) holds 1-3 objects on a lightly tinted, noisy background. An object
has a shape (`SHAPES`), a colour (`COLORS`, with a small per-object jitter), a size (`SIZES`) and a
position. Objects never overlap (their bounding circles are kept apart); with two or more objects
the first two are placed so that one lies clearly left of / right of / above / below the other.

Captions are exact: every caption names the colour and shape of every object (sizes, positions and
the relation of the first two objects appear in some phrasings). Five distinct captions per image,
drawn from several phrasings; when two or three objects share colour and shape one caption counts
them ("two green triangles").

Held-out combinations: the (colour, shape) pairs in `HELD_OUT_PAIRS` (8 of the 48 pairs, 16.7%)
never appear in train; every val and test image has at least one object with a held-out pair, so
val/test measure compositional generalisation.

Example dict:
  image: `[S, S, 3]` uint8.
  captions: tuple of 5 distinct str.
  mask: `[S, S]` uint8, 0 = background, k = the k-th object (1-based; later objects on top).
  object_shape, object_color, object_size: `[3]` int32 indices into SHAPES / COLORS / SIZES,
    -1 padded.
  num_objects: int in 1..3.
  image_id: int, the index in the split.
"""

import dataclasses
import functools
import itertools
import math
import string
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from vlalign.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
SHAPE_PLURALS = ("circles", "squares", "triangles", "diamonds", "stars", "crosses")
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
COLOR_RGB = np.array(
  [
    (220, 40, 40),
    (245, 140, 20),
    (235, 215, 25),
    (40, 160, 55),
    (25, 195, 205),
    (40, 70, 220),
    (135, 50, 185),
    (245, 120, 190),
  ],
  dtype=np.int16,
)
_COLOR_RGB_LISTS = COLOR_RGB.tolist()
SIZES = ("small", "large")
SIZE_RADIUS = (0.09, 0.15)  # Bounding-circle radius as a fraction of the image side.
MAX_OBJECTS = 3
MIN_IMAGE_SIZE = 32  # Small objects need a few pixels to keep their shape.

# (colour, shape) pairs never rendered in train; each colour is held out with exactly one shape.
HELD_OUT_PAIRS = (
  ("red", "triangle"),
  ("orange", "circle"),
  ("yellow", "square"),
  ("green", "star"),
  ("cyan", "diamond"),
  ("blue", "cross"),
  ("purple", "circle"),
  ("pink", "triangle"),
)

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
DEFAULT_SPLIT_SIZES = {"train": 200_000, "val": 1_000, "test": 1_000}

_JITTER = 20  # Max per-channel offset of an object's colour.
_NOISE = 6  # Max per-pixel, per-channel background/object noise.
_MIN_DOMINANCE = 1.5  # |dx| / |dy| (or the inverse) of the first two objects' centres.
_PLACEMENT_TRIES = 60
_SAME_PAIR_PROB = 0.25  # Chance that object 2 copies object 1's colour and shape (count captions).

_ALL_PAIRS = tuple(itertools.product(range(len(COLORS)), range(len(SHAPES))))
_HELD_OUT_IDS = tuple((COLORS.index(c), SHAPES.index(s)) for c, s in HELD_OUT_PAIRS)
_TRAIN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in set(_HELD_OUT_IDS))


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
  angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
  radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
  return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross(arm: float = 0.95, half_width: float = 0.32) -> np.ndarray:
  a, w = arm, half_width
  return np.array(
    [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w)]
    + [(-a, -w), (-w, -w)]
  )


# Outlines inside the unit circle (y points down), scaled by the object's radius; None = a disc.
_UNIT_OUTLINES = {
  "circle": None,
  "square": np.array([(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]),
  "triangle": np.array([(0.0, -1.0), (0.866, 0.5), (-0.866, 0.5)]),
  "diamond": np.array([(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)]),
  "star": _star(),
  "cross": _cross(),
}

# Caption phrasings. Fields: {a} {b} {c}: objects 1-3 with article and size ("a large red circle");
# {a_} {b_} {c_}: without size; {pos}: where object 1 is; {rel}: object 1 relative to object 2
# ("to the left of"), {inv}: object 2 relative to object 1, {inv_bare}: the same without "to the"
# ("left of"); {size} {color} {shape}: object 1's words; {groups}: objects grouped with counts.
_ONE_OBJECT = (
  "{a}",
  "{a_} {pos}",
  "a picture of {a}",
  "there is {a} {pos}",
  "a {size} {shape} that is {color}",
  "one {size} {color} {shape}",
  "an image with {a} {pos}",
)
_TWO_OBJECTS = (
  "{a} {rel} {b}",
  "{b} is {inv_bare} {a}",
  "{a} and {b}",
  "{a_} {rel} {b_}",
  "there is {b} {inv} {a}",
  "a picture of {b} and {a}",
  "{b_} is {inv_bare} {a_}",
)
_THREE_OBJECTS = (
  "{a} , {b} and {c}",
  "{a} {rel} {b} , and {c}",
  "three shapes , {a_} , {b_} and {c_}",
  "{b} is {inv_bare} {a} , there is also {c}",
  "a picture of {c} , {a} and {b}",
  "there are three shapes , {c} , {b} and {a}",
  "{a_} {rel} {b_} and also {c_}",
)
_COUNT_REQUIRED = "{groups}"  # Always among the 5 captions when objects share colour and shape.
_COUNT_OPTIONAL = ("a picture of {groups}",)
_COUNT_WORDS = ("one", "two", "three")

_RELATION = {
  "left": "to the left of",
  "right": "to the right of",
  "above": "above",
  "below": "below",
}
_RELATION_BARE = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
_INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# Thirds of the image: _POSITION[row][col], row 0 = top, col 0 = left.
_POSITION = (
  ("in the top left", "at the top", "in the top right"),
  ("on the left", "in the center", "on the right"),
  ("in the bottom left", "at the bottom", "in the bottom right"),
)

NUM_CAPTIONS = 5


@dataclasses.dataclass(frozen=True)
class ZeroShotTask:
  """Classify the single object of one-object images.

  Attributes:
    class_names: class `k` is named `class_names[k]`.
    templates: prompts with one `{}` each, filled with a class name.
    label: `label(example) -> int`, the class of `example` or -1 when it does not qualify.
  """

  class_names: tuple[str, ...]
  templates: tuple[str, ...]
  label: Callable[[dict], int]


def _single_object_label(attribute: str, example: dict) -> int:
  if int(example["num_objects"]) != 1:
    return -1
  return int(example[attribute][0])


ZEROSHOT_TASKS: dict[str, ZeroShotTask] = {
  "shape": ZeroShotTask(
    class_names=SHAPES,
    templates=(
      "a {}",
      "a picture of a {}",
      "a photo of a {} shape",
      "there is a {}",
      "a {} object",
    ),
    label=functools.partial(_single_object_label, "object_shape"),
  ),
  "color": ZeroShotTask(
    class_names=COLORS,
    templates=(
      "a {} shape",
      "a {} object",
      "a picture of a {} object",
      "something {}",
      "the object is {}",
    ),
    label=functools.partial(_single_object_label, "object_color"),
  ),
  "size": ZeroShotTask(
    class_names=SIZES,
    templates=("a {} shape", "a {} object", "a picture of a {} object", "the object is {}"),
    label=functools.partial(_single_object_label, "object_size"),
  ),
}


def _literal_words(template: str) -> set[str]:
  words = set()
  for literal, _, _, _ in string.Formatter().parse(template):
    words.update(literal.split())
  return words


def vocabulary() -> list[str]:
  """Every word (and the ',' token) the captions and zero-shot templates can contain, sorted."""
  words = set(COLORS) | set(SHAPES) | set(SHAPE_PLURALS) | set(SIZES) | set(_COUNT_WORDS)
  words |= {"a", "an", "and"}  # Articles and the group separator added by the code.
  templates = _ONE_OBJECT + _TWO_OBJECTS + _THREE_OBJECTS + (_COUNT_REQUIRED, *_COUNT_OPTIONAL)
  templates += tuple(t for task in ZEROSHOT_TASKS.values() for t in task.templates)
  for phrase in itertools.chain(
    templates, _RELATION.values(), _RELATION_BARE.values(), itertools.chain(*_POSITION)
  ):
    words |= _literal_words(phrase)
  return sorted(words)


class _Draws:
  """Scalar random draws served from vectorised `rng.random` calls (numpy calls have overhead).

  `rng` stays available for array draws (placement tries, pixel noise).
  """

  _CHUNK = 48

  def __init__(self, rng: np.random.Generator):
    self.rng = rng
    self._values: list[float] = []
    self._pos = 0

  def uniform(self) -> float:
    if self._pos == len(self._values):
      self._values = self.rng.random(self._CHUNK).tolist()
      self._pos = 0
    self._pos += 1
    return self._values[self._pos - 1]

  def integer(self, high: int) -> int:
    """Uniform in [0, high)."""
    return min(int(self.uniform() * high), high - 1)

  def sample(self, population: int, count: int) -> list[int]:
    """`count` distinct indices of range(population), in increasing order."""
    keys = [self.uniform() for _ in range(population)]
    return sorted(sorted(range(population), key=keys.__getitem__)[:count])


@dataclasses.dataclass(frozen=True)
class _Object:
  shape: int
  color: int
  size: int
  cx: float
  cy: float
  radius: float


def _noun_phrase(obj: _Object, with_size: bool = True) -> str:
  words = ([SIZES[obj.size]] if with_size else []) + [COLORS[obj.color], SHAPES[obj.shape]]
  article = "an" if words[0][0] in "aeiou" else "a"
  return " ".join([article, *words])


def _relation(first: _Object, second: _Object) -> str:
  """Where `first` lies relative to `second`: left / right / above / below (y points down)."""
  dx, dy = second.cx - first.cx, second.cy - first.cy
  if abs(dx) >= abs(dy):
    return "left" if dx > 0 else "right"
  return "above" if dy > 0 else "below"


def _position(obj: _Object, image_size: int) -> str:
  col = min(int(3 * obj.cx / image_size), 2)
  row = min(int(3 * obj.cy / image_size), 2)
  return _POSITION[row][col]


def _groups_phrase(objects: list[_Object]) -> str | None:
  """'two red circles and a small blue square'; None when all (colour, shape) pairs differ."""
  groups: dict[tuple[int, int], list[_Object]] = {}
  for obj in objects:
    groups.setdefault((obj.color, obj.shape), []).append(obj)
  if len(groups) == len(objects):
    return None
  parts = []
  for (color, shape), members in groups.items():
    if len(members) == 1:
      parts.append(_noun_phrase(members[0]))
      continue
    sizes = {m.size for m in members}
    size_words = [SIZES[sizes.pop()]] if len(sizes) == 1 else []
    count = _COUNT_WORDS[len(members) - 1]
    parts.append(" ".join([count, *size_words, COLORS[color], SHAPE_PLURALS[shape]]))
  return " and ".join(parts)


def _captions(objects: list[_Object], image_size: int, draws: _Draws) -> tuple[str, ...]:
  """5 distinct exact captions of `objects`."""
  fields = {}
  for key, obj in zip("abc", objects):
    fields[key] = _noun_phrase(obj)
    fields[key + "_"] = _noun_phrase(obj, with_size=False)
  first = objects[0]
  fields.update(
    pos=_position(first, image_size),
    size=SIZES[first.size],
    color=COLORS[first.color],
    shape=SHAPES[first.shape],
  )
  if len(objects) >= 2:
    rel = _relation(objects[0], objects[1])
    fields.update(
      rel=_RELATION[rel], inv=_RELATION[_INVERSE[rel]], inv_bare=_RELATION_BARE[_INVERSE[rel]]
    )
  templates = (_ONE_OBJECT, _TWO_OBJECTS, _THREE_OBJECTS)[len(objects) - 1]
  required: list[str] = []
  pool = [t.format(**fields) for t in templates]
  groups = _groups_phrase(objects)
  if groups is not None:
    required.append(_COUNT_REQUIRED.format(groups=groups))
    pool += [t.format(groups=groups) for t in _COUNT_OPTIONAL]
  picks = draws.sample(len(pool), NUM_CAPTIONS - len(required))
  captions = tuple(required + [pool[i] for i in sorted(picks)])
  assert len(set(captions)) == NUM_CAPTIONS, captions
  return captions


def _sample_pairs(num: int, split: str, draws: _Draws) -> list[tuple[int, int]]:
  """(colour, shape) per object: train avoids held-out pairs, val/test contain at least one."""
  allowed = _TRAIN_PAIRS if split == "train" else _ALL_PAIRS
  pairs = [allowed[draws.integer(len(allowed))] for _ in range(num)]
  copied = num >= 2 and draws.uniform() < _SAME_PAIR_PROB
  if copied:
    pairs[1] = pairs[0]
  if split != "train" and not any(p in _HELD_OUT_IDS for p in pairs):
    target = draws.integer(num)
    pair = _HELD_OUT_IDS[draws.integer(len(_HELD_OUT_IDS))]
    pairs[target] = pair
    if copied and target < 2:
      pairs[1 - target] = pair
  return pairs


def _placement_ok(centres: list[list[float]], radii: list[float]) -> bool:
  """Bounding circles at least 1 px apart; the first two objects clearly side by side or stacked."""
  for i, j in itertools.combinations(range(len(radii)), 2):
    dx, dy = centres[i][0] - centres[j][0], centres[i][1] - centres[j][1]
    if math.hypot(dx, dy) < radii[i] + radii[j] + 1.0:
      return False
  if len(radii) >= 2:
    dx = abs(centres[1][0] - centres[0][0])
    dy = abs(centres[1][1] - centres[0][1])
    if max(dx, dy) < _MIN_DOMINANCE * min(dx, dy):
      return False
  return True


def _place(radii: list[float], image_size: int, rng: np.random.Generator) -> list | None:
  """Centres `[n][x, y]` of non-overlapping objects inside the image; None if none was found."""
  for _ in range(_PLACEMENT_TRIES):
    unit = rng.random((len(radii), 2)).tolist()
    centres = [
      [r + 1.0 + u * (image_size - 2.0 - 2.0 * r) for u in point] for r, point in zip(radii, unit)
    ]
    if _placement_ok(centres, radii):
      return centres
  return None


def _sample_objects(split: str, image_size: int, draws: _Draws) -> list[_Object]:
  num = 1 + draws.integer(MAX_OBJECTS)
  while True:
    pairs = _sample_pairs(num, split, draws)
    sizes = [draws.integer(len(SIZES)) for _ in range(num)]
    radii = [SIZE_RADIUS[s] * image_size for s in sizes]
    centres = _place(radii, image_size, draws.rng)
    if centres is not None:
      break
    num -= 1  # Rare: the image is too crowded; try again with one object fewer.
  return [
    _Object(shape=p[1], color=p[0], size=s, cx=c[0], cy=c[1], radius=r)
    for p, s, c, r in zip(pairs, sizes, centres, radii)
  ]


def _draw(draw: ImageDraw.ImageDraw, obj: _Object, fill) -> None:
  outline = _UNIT_OUTLINES[SHAPES[obj.shape]]
  if outline is None:
    r = obj.radius
    draw.ellipse((obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r), fill=fill)
  else:
    points = outline * obj.radius + (obj.cx, obj.cy)
    draw.polygon([tuple(p) for p in points.tolist()], fill=fill)


def _render(
  objects: list[_Object], image_size: int, draws: _Draws
) -> tuple[np.ndarray, np.ndarray]:
  """`(image [S, S, 3] uint8, mask [S, S] uint8)` of `objects` on a tinted, noisy background.

  One RGBA canvas is drawn: RGB is the picture, alpha the object index (drawing replaces pixels).
  Every colour stays within [_NOISE, 255 - _NOISE] so that adding the noise needs no clipping.
  """
  base = 150 + draws.integer(76)
  background = (*(base - 12 + draws.integer(25) for _ in range(3)), 0)
  canvas = Image.new("RGBA", (image_size, image_size), background)
  draw = ImageDraw.Draw(canvas)
  for k, obj in enumerate(objects, start=1):
    jitter = [draws.integer(2 * _JITTER + 1) - _JITTER for _ in range(3)]
    rgb = [
      min(max(c + j, _NOISE), 255 - _NOISE) for c, j in zip(_COLOR_RGB_LISTS[obj.color], jitter)
    ]
    _draw(draw, obj, (*rgb, k))
  pixels = np.array(canvas)
  noise = draws.rng.integers(0, 2 * _NOISE + 1, size=(image_size, image_size, 3), dtype=np.uint8)
  image = pixels[..., :3] - np.uint8(_NOISE)
  image += noise
  return image, np.ascontiguousarray(pixels[..., 3])


def _padded(values: list[int]) -> np.ndarray:
  return np.array(values + [-1] * (MAX_OBJECTS - len(values)), dtype=np.int32)


class ShapesSource:
  """Grain random-access source of rendered shape images (see the module docstring).

  Args:
    split: "train", "val" or "test".
    num_examples: number of examples; defaults to `DEFAULT_SPLIT_SIZES[split]`.
    image_size: side `S` of the square images.
    seed: dataset seed; the same seed renders the same examples.
  """

  def __init__(
    self, split: str, *, num_examples: int | None = None, image_size: int = 64, seed: int = 0
  ):
    if split not in SPLIT_IDS:
      raise ConfigError(f"unknown shapes split {split!r}; choose one of {sorted(SPLIT_IDS)}")
    num_examples = DEFAULT_SPLIT_SIZES[split] if num_examples is None else int(num_examples)
    if num_examples <= 0:
      raise ConfigError(f"the shapes {split!r} split has no examples (num_examples={num_examples})")
    if image_size < MIN_IMAGE_SIZE:
      raise ConfigError(
        f"image_size={image_size} is too small to draw shapes; use >= {MIN_IMAGE_SIZE}"
      )
    self.split = split
    self.num_examples = num_examples
    self.image_size = int(image_size)
    self.seed = int(seed)
    self._split_id = SPLIT_IDS[split]

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return (
      f"ShapesSource(split={self.split!r}, num_examples={self.num_examples}, "
      f"image_size={self.image_size}, seed={self.seed})"
    )

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self!r}")
    draws = _Draws(np.random.default_rng([self.seed, self._split_id, index]))
    objects = _sample_objects(self.split, self.image_size, draws)
    image, mask = _render(objects, self.image_size, draws)
    return {
      "image": image,
      "captions": _captions(objects, self.image_size, draws),
      "mask": mask,
      "object_shape": _padded([o.shape for o in objects]),
      "object_color": _padded([o.color for o in objects]),
      "object_size": _padded([o.size for o in objects]),
      "num_objects": len(objects),
      "image_id": index,
    }
