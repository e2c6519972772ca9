"""Momentum distillation (ALBEF, and TCL = ALBEF + a second view + its loss set): an EMA teacher,
feature queues, the alpha ramp, and optionally ITM on hard negatives and MLM.

Reference: salesforce/ALBEF and its TCL fork uta-smile/TCL, `models/model_pretrain.py` (class
`ALBEF`), `Pretrain.py` (`train`) and `configs/Pretrain.yaml` (momentum 0.995, queue_size 65536,
alpha 0.4).

Config sections this method reads:

  teacher: momentum, queue_size (a multiple of the global batch), alpha, alpha_warmup_steps;
           optional image_key ("image"; TCL: "image_aug", the second view), dropout (True: the
           teacher runs in train mode, so its text is a dropout view), queue_image_id (False)
  itm:     optional; present = ITM on positives + one negative image per text and one negative text
           per image; fields hard_negatives (True: sampled from the ITC softmax as ALBEF; False:
           uniform among the allowed pairs), exclude_same_image (True: pairs of the same image_id
           are never negatives, as retrieval fine-tuning; False: only the pair itself, as ALBEF /
           TCL pre-training). Needs a model with `itm_pairs` (model.name="albef").
  mlm:     optional; present = image-conditioned MLM on BERT-masked text; fields prob (0.15),
           mask_id, special_ids (default: the tokenizer's [MASK] and ([CLS], [PAD])).

Order of one step (equations in docs/methods.md):

1. `before_gradient`: text masking (mask rng), then the EMA update
   theta_t <- m * theta_t + (1 - m) * theta_s (`ALBEF._momentum_update`; it runs before the
   teacher's forward, so step 0's update is a no-op as the teacher starts as a student copy), then
   the teacher's forward on `batch[image_key]` and the masked text (no gradient, own dropout rng),
   then alpha = alpha_max * min(1, step / alpha_warmup_steps) (`Pretrain.py`: ramped over epoch 0).
   The context holds `teacher` (its outputs), `extras` (queues before this step's enqueue, the
   updated teacher), `schedules["alpha"]` and `inputs["mlm_ids"]`, `inputs["mlm_labels"]`.
2. `forward`: the student's outputs, then (with `itm`) hard negatives sampled from
   softmax(student_emb . teacher_emb / tau) (within each loss group with `config.loss_group_size`,
   as within each GPU of the official runs) and the ITM pairs, then (with `mlm`) the masked-LM pass.
3. `after_update`: the global batch of teacher features (all groups, as the official all-gather)
   overwrites queue rows [ptr, ptr + B) (`ALBEF._dequeue_and_enqueue`), ptr <- (ptr + B) mod K;
   with `queue_image_id` the batch's image ids go to `queue/image_id` too (retrieval fine-tuning's
   `idx_queue`).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vlalign.data import pipeline
from vlalign.errors import ConfigError
from vlalign.losses import LossContext, groups
from vlalign.losses.matching import mask_tokens, sample_hard_negatives
from vlalign.losses.momentum import temperature
from vlalign.methods import register
from vlalign.methods.base import Batch, Method, Outputs, check_section

QUEUED = {"queue/img": "img/emb", "queue/txt": "txt/emb"}  # queue -> teacher output it stores
IMAGE_ID_QUEUE = "queue/image_id"
QUEUE_FILL_ID = -1  # never an image id: empty slots match nothing

_TEACHER_REQUIRED = {"momentum", "queue_size", "alpha", "alpha_warmup_steps"}
_TEACHER_OPTIONAL = {"image_key", "dropout", "queue_image_id"}


def ema_update(teacher_params: Any, student_params: Any, momentum: float | jax.Array) -> Any:
  """theta_t <- momentum * theta_t + (1 - momentum) * theta_s, leaf by leaf (teacher dtypes)."""

  def blend(t, s):
    return (momentum * t + (1.0 - momentum) * s).astype(t.dtype)

  return jax.tree.map(blend, teacher_params, jax.lax.stop_gradient(student_params))


def alpha_at(step: int | jax.Array, steps_per_epoch: int, alpha_max: float = 0.4) -> jax.Array:
  """Distillation weight: linear ramp 0 -> alpha_max over the first epoch, then constant.

  Args:
    step: 0-based index of the current update (`TrainState.step` before it is incremented).
    steps_per_epoch: updates per epoch (`len(data_loader)` in the reference).
    alpha_max: `alpha` of `configs/Pretrain.yaml` (0.4).

  Returns:
    `[]` float32.
  """
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
  progress = jnp.asarray(step, jnp.float32) / float(steps_per_epoch)
  return alpha_max * jnp.minimum(1.0, progress)


def enqueue(queue: jax.Array, ptr: jax.Array, feats: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Ring-buffer write of a batch of features.

  Args:
    queue: `[K, ...]` features of past batches.
    ptr: `[]` int32 index of the oldest slot (reduced modulo K before writing).
    feats: `[B, ...]` features of the whole (global) batch; K must be a multiple of B.

  Returns:
    `(queue [K, ...], ptr [])`: rows [ptr, ptr + B) replaced by `feats`, ptr advanced by B mod K.
  """
  size, batch = queue.shape[0], feats.shape[0]
  if batch == 0 or size % batch:
    raise ValueError(
      f"queue size {size} must be a positive multiple of the global batch size {batch} "
      "(the reference asserts queue_size % batch_size == 0)"
    )
  if queue.shape[1:] != feats.shape[1:]:
    raise ValueError(f"queue rows {queue.shape[1:]} and features {feats.shape[1:]} differ")
  ptr = jnp.asarray(ptr, jnp.int32) % size
  feats = jax.lax.stop_gradient(feats).astype(queue.dtype)
  queue = jax.lax.dynamic_update_slice_in_dim(queue, feats, ptr, axis=0)
  return queue, (ptr + batch) % size


def random_unit_rows(rng: jax.Array, rows: int, dim: int) -> jax.Array:
  """`[rows, dim]` float32 random unit vectors (how ALBEF initialises its queues)."""
  x = jax.random.normal(rng, (rows, dim), jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@register("momentum")
class MomentumDistillation(Method):
  """ALBEF-style momentum distillation; see the module docstring for config and order."""

  config_fields = ("teacher", "itm", "mlm")

  def validate(self) -> None:
    config = self.config
    teacher = check_section(config, "teacher", _TEACHER_REQUIRED, _TEACHER_OPTIONAL)
    queue_size, batch_size = int(teacher["queue_size"]), int(config.batch_size)
    if queue_size <= 0 or queue_size % batch_size:
      raise ConfigError(
        f"config.teacher.queue_size={queue_size} must be a positive multiple of the global batch "
        f"size {batch_size} (each step writes one global batch of teacher features)"
      )
    if not 0.0 <= float(teacher["momentum"]) <= 1.0:
      raise ConfigError(f"config.teacher.momentum={teacher['momentum']} must be in [0, 1]")
    if not 0.0 <= float(teacher["alpha"]) <= 1.0:
      raise ConfigError(f"config.teacher.alpha={teacher['alpha']} must be in [0, 1]")
    if int(teacher["alpha_warmup_steps"]) <= 0:
      raise ConfigError("config.teacher.alpha_warmup_steps must be > 0")
    self.image_key = teacher.get("image_key", "image")
    batch_keys = pipeline.train_batch_keys(config.data)
    if self.image_key not in batch_keys:
      raise ConfigError(
        f"config.teacher.image_key={self.image_key!r} is not a key of the train batch "
        f"{batch_keys}; the second view 'image_aug' needs config.data.augment_views=2"
      )
    self.teacher = teacher
    self.group_size = groups.group_size_of(config)
    self.itm = None
    if config.get("itm") is not None:
      self.itm = check_section(config, "itm", set(), {"hard_negatives", "exclude_same_image"})
      self._require_model_method("itm_pairs", "itm")
    self.mlm = None
    if config.get("mlm") is not None:
      self._require_model_method("masked_lm", "mlm")
      mlm = check_section(config, "mlm", set(), {"prob", "mask_id", "special_ids"})
      self.mlm = self._resolve_mlm(mlm)

  def _require_model_method(self, name: str, section: str) -> None:
    if not hasattr(self.model, name):
      raise ConfigError(
        f"config.{section} needs a model with `{name}` (an ITM / MLM head): "
        f"config.model.name={self.config.model.get('name')!r} has none; use 'albef'"
      )

  def _resolve_mlm(self, mlm: dict) -> dict:
    """`mlm` with the tokenizer's `mask_id` and `special_ids` ([CLS], [PAD]: the ids ALBEF never
    masks); ids the config sets must agree with the tokenizer."""
    tok = self.tokenizer
    if tok.mask_id < 0:
      raise ConfigError(
        "config.losses.mlm needs a tokenizer with a mask token; the tokenizer has none "
        "(drop the mlm loss or use a tokenizer with [MASK])"
      )
    special = tuple(i for i in (tok.cls_id, tok.pad_id) if i is not None)
    want = {"mask_id": tok.mask_id, "special_ids": special}
    for key, value in want.items():
      given = mlm.get(key)
      if given is not None and (tuple(given) if isinstance(value, tuple) else given) != value:
        raise ConfigError(f"config.mlm.{key}={given} disagrees with the tokenizer's {value}")
      mlm[key] = value
    mlm["vocab_size"] = int(self.config.model.text.vocab_size)
    return mlm

  # --- State --------------------------------------------------------------------------------------

  def init_extras(self, params: Any, rng: jax.Array) -> dict[str, Any]:
    """Teacher = a copy of the student; queues of random unit vectors (as ALBEF initialises
    them), an optional image-id queue of `QUEUE_FILL_ID`, and the shared pointer."""
    size, dim = int(self.teacher["queue_size"]), int(self.config.model.embed_dim)
    extras: dict[str, Any] = {"teacher": jax.tree.map(jnp.copy, params)}
    for i, key in enumerate(QUEUED):
      extras[key] = random_unit_rows(jax.random.fold_in(rng, i), size, dim)
    if self.teacher.get("queue_image_id", False):
      extras[IMAGE_ID_QUEUE] = jnp.full((size,), QUEUE_FILL_ID, jnp.int32)
    extras["queue/ptr"] = jnp.zeros((), jnp.int32)
    return extras

  # --- Step ---------------------------------------------------------------------------------------

  def mask_inputs(self, batch: Batch, rng: jax.Array) -> dict[str, jax.Array]:
    """`{"mlm_ids", "mlm_labels"}` `[B, L]` (BERT masking of `text_ids`), or `{}` without MLM."""
    if self.mlm is None:
      return {}
    ids, labels = mask_tokens(
      batch["text_ids"],
      batch["text_mask"],
      rng,
      vocab_size=self.mlm["vocab_size"],
      mask_id=int(self.mlm["mask_id"]),
      special_ids=tuple(self.mlm["special_ids"]),
      prob=float(self.mlm.get("prob", 0.15)),
    )
    return {"mlm_ids": ids, "mlm_labels": labels}

  def teacher_forward(
    self, teacher_params: Any, batch: Batch, inputs: dict[str, jax.Array], rng: jax.Array
  ) -> Outputs:
    """The teacher's outputs on its image view and the (masked) text, without gradient."""
    view = {**batch, "image": batch[self.image_key]}
    train = bool(self.teacher.get("dropout", True))

    def run(module):
      out = module(view, train=train)
      if self.mlm is not None:
        out.update(module.masked_lm(out, inputs["mlm_ids"], batch["text_mask"], train))
      return out

    outputs = self.model.apply(teacher_params, method=run, rngs={"dropout": rng})
    return jax.lax.stop_gradient(outputs)

  def before_gradient(self, state: Any, batch: Batch, rng: jax.Array) -> LossContext:
    rngs = self.split_rngs(rng)
    inputs = self.mask_inputs(batch, rngs["mask"])
    teacher_params = ema_update(
      state.extras["teacher"], state.params, float(self.teacher["momentum"])
    )
    teacher_out = self.teacher_forward(teacher_params, batch, inputs, rngs["teacher"])
    alpha = alpha_at(
      state.step, int(self.teacher["alpha_warmup_steps"]), float(self.teacher["alpha"])
    )
    return LossContext(
      step=state.step,
      batch=batch,
      inputs=inputs,
      teacher=teacher_out,
      extras={**state.extras, "teacher": teacher_params},
      schedules={"alpha": alpha},
      rngs=rngs,
    )

  def itm_negatives(
    self, out: Outputs, ctx: LossContext, rng: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """`(neg_text [B], neg_image [B])`: drawn from softmax(student . teacher / tau) (ALBEF) with
    `hard_negatives`, else uniformly; pairs of the same image are never drawn (with
    `exclude_same_image`; else only the pair itself is excluded). With loss groups
    (`config.loss_group_size`), candidates come from the example's own group only, as on a GPU
    of the official runs."""
    batch_size = out["img/emb"].shape[0]
    group_size = self.group_size or batch_size
    hard = self.itm.get("hard_negatives", True)
    tau = temperature(out)

    def sample(img, txt, teacher_img, teacher_txt, image_id, key):
      if hard:
        sim_i2t, sim_t2i = img @ teacher_txt.T / tau, txt @ teacher_img.T / tau
      else:
        sim_i2t = sim_t2i = jnp.zeros((img.shape[0], img.shape[0]), jnp.float32)
      return sample_hard_negatives(sim_i2t, sim_t2i, image_id, key)

    image_id = ctx.batch["image_id"]
    if not self.itm.get("exclude_same_image", True):  # ALBEF pre-training: the diagonal only
      image_id = jnp.arange(batch_size, dtype=jnp.int32)
    arrays = (
      out["img/emb"],
      out["txt/emb"],
      ctx.teacher["img/emb"],
      ctx.teacher["txt/emb"],
      image_id,
    )
    if group_size == batch_size:
      return sample(*arrays, rng)
    num_groups = batch_size // group_size
    cut = [groups.split(a, batch_size, group_size) for a in arrays]
    neg_text, neg_image = jax.vmap(sample)(*cut, groups.group_keys(rng, num_groups))
    offset = (jnp.arange(num_groups, dtype=jnp.int32) * group_size)[:, None]
    return (neg_text + offset).reshape(batch_size), (neg_image + offset).reshape(batch_size)

  def forward(self, params: Any, ctx: LossContext) -> Outputs:
    batch = ctx.batch

    def run(module):
      out = module(batch, train=True)
      if self.itm is not None:
        neg_text, neg_image = self.itm_negatives(out, ctx, module.make_rng("sample"))
        out.update(module.itm_pairs(out, batch["text_mask"], neg_text, neg_image, train=True))
      if self.mlm is not None:
        out.update(module.masked_lm(out, ctx.inputs["mlm_ids"], batch["text_mask"], train=True))
      return out

    rngs = {"dropout": ctx.rngs["dropout"], "sample": ctx.rngs["sample"]}
    return self.model.apply(params, method=run, rngs=rngs)

  def after_update(self, ctx: LossContext, outputs: Outputs, params: Any) -> dict[str, Any]:
    """Writes the global batch of teacher embeddings (and, with `queue/image_id`, the batch's
    `image_id` `[B]`) into the queues, which share one pointer."""
    del outputs, params
    extras = dict(ctx.extras)
    ptr = extras["queue/ptr"]
    new_ptr = ptr
    for queue_key, output_key in QUEUED.items():
      extras[queue_key], new_ptr = enqueue(extras[queue_key], ptr, ctx.teacher[output_key])
    if IMAGE_ID_QUEUE in extras:
      extras[IMAGE_ID_QUEUE], _ = enqueue(extras[IMAGE_ID_QUEUE], ptr, ctx.batch["image_id"])
    extras["queue/ptr"] = new_ptr
    return extras

  # --- Evaluation ---------------------------------------------------------------------------------

  def predict_fns(self) -> dict[str, Callable[..., Any]]:
    """The two-tower encoders, plus, for a model with an ITM head, what the `retrieval_itm`
    evaluator needs: `encode_image_tokens(params, images) -> (emb [B, E], tokens [B, 1+N, Di])`,
    `encode_text_tokens(params, ids, mask) -> (emb [B, E], tokens [B, L, Dt])` and
    `itm_score(params, image_tokens, text_tokens, text_mask) -> [n]` ("match" logits)."""
    fns = super().predict_fns()
    model, cls = self.model, type(self.model)
    if not hasattr(model, "itm_logits"):
      return fns

    def encode_image_tokens(params, images):
      out = model.apply(params, images, method=cls.encode_image)
      return out["img/emb"], out["img/all_tokens"]

    def encode_text_tokens(params, ids, mask):
      out = model.apply(params, ids, mask, method=cls.encode_text)
      return out["txt/emb"], out["txt/tokens"]

    def itm_score(params, image_tokens, text_tokens, text_mask):
      def score(module):
        return module.itm_match_logits(text_tokens, text_mask, image_tokens)[:, 1]

      return model.apply(params, method=score)

    fns.update(
      encode_image_tokens=encode_image_tokens,
      encode_text_tokens=encode_text_tokens,
      itm_score=itm_score,
    )
    return fns
