"""LexVLA's model (`model.name: lexvla`): both modalities as lexical representations.

Li et al., "Unified Lexical Representation for Interpretable Visual-Language Alignment", NeurIPS
2024. A lexical representation is a non-negative vector over a lexicon of V words whose entry j is
the similarity of the sample to word j (docs/methods.md, "LexVLA"):

    text:   h = text_tower(prompted caption) at the prediction position        [B, Dt]
            txt/lex = normalize(act(text_mapper(h) @ C_t^T))                    [B, V]
    image:  z = image_mapper(adapter(image_tower(image).tokens))               [B, N, Dt]
            img/patch_lex = act(z @ C_v^T)                                      [B, N, V]
            img/lex = normalize(max over the N patches of img/patch_lex)       [B, V]

(the paper's equations 2 and 4; `normalize` is L2 normalisation). `C_t` `[V, Dt]` is the text
codebook: the language model's output codebook (`lm_head`) when the text tower has one, else its
token embedding table (`text_codebook: output | input`), restricted to the lexicon's token ids
(`lexicon_ids`; None: every token), and never trained (read through `stop_gradient`).
`C_v = stop_gradient(C_t) + visual_codebook_delta` is the visual codebook: initialised to the text
codebook (the delta starts at zero) and trained through the delta (the same gradient as a free
`[V, Dt]` parameter; weight decay, if configured on it, pulls it towards the text codebook rather
than towards zero). `act` is the paper's `elu1p(x) = ELU(x) + 1` (`activation: elu1p`, strictly
positive: sparsity comes from thresholding at inference), `log1p_relu` (`log(1 + relu(x))`, exact
zeros) or `relu`.

`img/emb` and `txt/emb` are the same unit vectors as `img/lex` and `txt/lex`, so the contrastive
losses (`itc`) and the dense retrieval / zero-shot evaluators apply unchanged.

Model config fields (besides `name`, `image`, `text`, `dtype`, `remat`, `logit_scale_init`):

  lexicon_ids: None (the text tower's whole vocabulary) or a tuple of V token ids
  adapter_depth: pre-LN transformer blocks (image tower's width, heads and MLP width) over the
                 patch tokens before the image mapper; 0 for none (default 1)
  image_mapper_hidden: hidden width of the image mapper MLP, or None for a linear map (default:
                       the text width)
  text_mapper: "none" (the paper: the prediction-position state scores the codebook directly;
               default), "residual" (`h + MLP(h)`, the MLP's output initialised to zero, so that
               the initial lexical vector is still the language model's own `h @ C_t^T`) or
               "linear"
  text_codebook: "output" (the tower's `lm_head`; default when it has one) | "input" (its token
                 embedding table)
  activation: "elu1p" (default) | "log1p_relu" | "relu"
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlalign.errors import ConfigError
from vlalign.models import MODELS, build_tower, scan, tower_outputs
from vlalign.models.heads import Projection, l2_normalize
from vlalign.models.layers import PARAM_DTYPE, Encoder, gelu

Batch = dict[str, jax.Array]
Outputs = dict[str, jax.Array]

ACTIVATIONS = ("elu1p", "log1p_relu", "relu")
TEXT_MAPPERS = ("none", "residual", "linear")
TEXT_CODEBOOKS = ("output", "input")


def lexical_activation(x: jax.Array, name: str) -> jax.Array:
  """Word scores `x` (any shape) -> non-negative lexical weights, float32."""
  x = x.astype(jnp.float32)
  if name == "elu1p":
    return jax.nn.elu(x) + 1.0
  if name == "log1p_relu":
    return jnp.log1p(jax.nn.relu(x))
  if name == "relu":
    return jax.nn.relu(x)
  raise ConfigError(f"unknown model.activation {name!r}; choose one of {ACTIVATIONS}")


class ResidualMapper(nn.Module):
  """`x + Dense(GELU(Dense(x)))`, the last Dense initialised to zero: `[..., D] -> [..., D]`, the
  identity at initialisation."""

  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = dict(dtype=self.dtype, param_dtype=PARAM_DTYPE)
    y = gelu(nn.Dense(self.hidden, name="hidden", **dense)(x))
    y = nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros, name="out", **dense)(y)
    return x + y


@MODELS.register("lexvla")
class LexicalModel(nn.Module):
  """Image and text towers mapped to lexical vectors over one lexicon (module docstring).

  `__call__(batch, train)` returns `img/patch_lex` `[B, N, V]` (activated, not normalised),
  `img/lex`, `txt/lex` `[B, V]` (unit norm, >= 0; also as `img/emb`, `txt/emb`), `img/cls`
  `[B, Di]`, `txt/cls` `[B, Dt]` and `logit_scale`, all float32 but the pooled states.
  """

  config: Any

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.get("dtype", "float32"))
    layers = scan.layer_options(c)
    self.act = c.get("activation", "elu1p")
    if self.act not in ACTIVATIONS:
      raise ConfigError(f"unknown model.activation {self.act!r}; choose one of {ACTIVATIONS}")
    text_mapper = c.get("text_mapper", "none")
    if text_mapper not in TEXT_MAPPERS:
      raise ConfigError(f"unknown model.text_mapper {text_mapper!r}; choose one of {TEXT_MAPPERS}")
    self.image_encoder = build_tower(c.image, "model.image", dtype=dtype, **layers)
    self.text_encoder = build_tower(c.text, "model.text", dtype=dtype, **layers)
    has_head = bool(c.text.get("lm_head", False))
    self.codebook_kind = c.get("text_codebook", "output" if has_head else "input")
    if self.codebook_kind not in TEXT_CODEBOOKS:
      raise ConfigError(f"model.text_codebook must be one of {TEXT_CODEBOOKS}")
    if self.codebook_kind == "output" and not has_head:
      raise ConfigError(
        "model.text_codebook='output' needs a text tower with an output codebook "
        "(model.text.lm_head=True, kind 'llama')"
      )
    if not hasattr(self.text_encoder, "embedding_table"):
      raise ConfigError(
        f"model 'lexvla' reads its text codebook from the text tower's token tables; tower kind "
        f"{c.text.kind!r} has none"
      )
    text_width = int(c.text.width)
    image = c.image
    depth = int(c.get("adapter_depth", 1))
    self.adapter = None
    if depth > 0:
      self.adapter = Encoder(
        depth=depth,
        num_heads=int(image.num_heads),
        mlp_dim=int(image.mlp_dim),
        dtype=dtype,
        layer_norm_eps=float(image.get("layer_norm_eps", 1e-6)),
        **layers,
        name="adapter",
      )
    self.image_mapper = Projection(
      text_width, hidden=c.get("image_mapper_hidden", text_width), use_bias=True, dtype=dtype
    )
    if text_mapper == "residual":
      self.text_mapper = ResidualMapper(text_width, dtype=dtype)
    elif text_mapper == "linear":
      self.text_mapper = Projection(text_width, use_bias=True, dtype=dtype)
    else:
      self.text_mapper = lambda x: x
    ids = c.get("lexicon_ids")
    self.lexicon_size = len(ids) if ids is not None else int(c.text.vocab_size)
    self.visual_codebook_delta = self.param(
      "visual_codebook_delta", nn.initializers.zeros, (self.lexicon_size, text_width), PARAM_DTYPE
    )
    self.logit_scale = self.param(
      "logit_scale", nn.initializers.constant(c.logit_scale_init), (), jnp.float32
    )

  def lexicon(self) -> jax.Array:
    """`[V]` int32 token ids of the lexicon's words."""
    ids = self.config.get("lexicon_ids")
    if ids is None:
      return jnp.arange(self.lexicon_size, dtype=jnp.int32)
    return jnp.asarray(ids, jnp.int32)

  def text_codebook(self) -> jax.Array:
    """`[V, Dt]` float32: the text tower's token embeddings of the lexicon, without gradient."""
    if self.codebook_kind == "output":
      table = self.text_encoder.output_embedding_table()
    else:
      table = self.text_encoder.embedding_table()
    table = jax.lax.stop_gradient(table)
    ids = self.config.get("lexicon_ids")
    return table if ids is None else table[self.lexicon()]

  def visual_codebook(self) -> jax.Array:
    """`[V, Dt]` float32: the text codebook plus the trained delta."""
    return self.text_codebook() + self.visual_codebook_delta

  def word_scores(self, features: jax.Array, codebook: jax.Array) -> jax.Array:
    """features `[..., Dt]`, codebook `[V, Dt]` -> activated lexical weights `[..., V]` float32."""
    scores = jnp.einsum("...d,vd->...v", features, codebook.astype(features.dtype))
    return lexical_activation(scores, self.act)

  def encode_image(self, images: jax.Array, train: bool = False) -> Outputs:
    """images `[B, H, W, 3]` -> `img/patch_lex` `[B, N, V]`, `img/lex`, `img/emb` `[B, V]`,
    `img/cls` `[B, Di]`."""
    out = self.image_encoder(images, train)
    tokens = out["tokens"]
    if self.adapter is not None:
      tokens = self.adapter(tokens, None, train)
    patch_lex = self.word_scores(self.image_mapper(tokens), self.visual_codebook())
    lex = l2_normalize(jnp.max(patch_lex, axis=1))
    return {"img/cls": out["cls"], "img/patch_lex": patch_lex, "img/lex": lex, "img/emb": lex}

  def encode_text(self, ids: jax.Array, mask: jax.Array, train: bool = False) -> Outputs:
    """ids, mask `[B, L]` -> `txt/lex`, `txt/emb` `[B, V]`, `txt/cls` `[B, Dt]` (the tower's
    pooled state: the prediction position of a prompted causal LM)."""
    pooled = tower_outputs(self.text_encoder, ids, mask, train=train, tokens=False)["cls"]
    lex = l2_normalize(self.word_scores(self.text_mapper(pooled), self.text_codebook()))
    return {"txt/cls": pooled, "txt/lex": lex, "txt/emb": lex}

  def scalars(self) -> Outputs:
    """`logit_scale`, a float32 scalar."""
    return {"logit_scale": self.logit_scale}

  def __call__(self, batch: Batch, train: bool = False) -> Outputs:
    """batch with `image`, `text_ids`, `text_mask` -> the output dict (class docstring)."""
    return {
      **self.encode_image(batch["image"], train),
      **self.encode_text(batch["text_ids"], batch["text_mask"], train),
      **self.scalars(),
    }
