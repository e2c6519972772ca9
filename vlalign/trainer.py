"""The training loop: sharded state, jitted step, checkpoints, periodic evaluation, metrics.

`train_and_evaluate(config, workdir)` is the library entry point; `vlalign.train` is its binary.
"""

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vlalign import checkpoint as ckpt_lib
from vlalign import evaluation, optim, sharding
from vlalign import metrics as metrics_lib
from vlalign import step as step_lib
from vlalign.data import pipeline
from vlalign.data.tokenizer import build_tokenizer
from vlalign.evaluation import report
from vlalign.models.model import build_model

REQUIRED_FIELDS = ("total_steps", "batch_size", "model", "data", "optim", "losses", "mesh")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for configs that cannot run, before anything is built."""
  missing = [f for f in REQUIRED_FIELDS if f not in config]
  if missing:
    raise ValueError(f"config lacks required fields: {missing}")
  for field in ("total_steps", "batch_size", "log_every", "checkpoint_every"):
    if int(config.get(field, 1)) <= 0:
      raise ValueError(f"config.{field}={config.get(field)} must be > 0")
  teacher = config.get("teacher")
  if teacher is not None:
    queue_size, batch_size = int(teacher.queue_size), int(config.batch_size)
    if queue_size <= 0 or queue_size % batch_size:
      raise ValueError(
        f"config.teacher.queue_size={queue_size} must be a positive multiple of the global batch "
        f"size {batch_size} (each step writes one global batch of teacher features)"
      )
    if not 0.0 <= float(teacher.momentum) <= 1.0:
      raise ValueError(f"config.teacher.momentum={teacher.momentum} must be in [0, 1]")
    image_key, batch_keys = (
      teacher.get("image_key", "image"),
      pipeline.train_batch_keys(config.data),
    )
    if image_key not in batch_keys:
      raise ValueError(
        f"config.teacher.image_key={image_key!r} is not a key of the train batch "
        f"{batch_keys}; the second view 'image_aug' needs "
        "config.data.augment_views=2"
      )
  if config.get("mlm") is not None and config.model.get("name") != "albef":
    raise ValueError("config.mlm needs a model with an MLM head: set config.model.name='albef'")


def resolve_mlm(config: ml_collections.ConfigDict, tokenizer: Any) -> ml_collections.ConfigDict:
  """A copy of `config` whose `mlm` has the tokenizer's `mask_id` and `special_ids` ([CLS],
  [PAD]: the ids ALBEF never masks); ids a config sets must agree with the tokenizer."""
  if config.get("mlm") is None:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  want = {"mask_id": tokenizer.mask_id, "special_ids": (tokenizer.cls_id, tokenizer.pad_id)}
  for key, value in want.items():
    given = config.mlm.get(key)
    if given is not None and (tuple(given) if isinstance(value, tuple) else given) != value:
      raise ValueError(f"config.mlm.{key}={given} disagrees with the tokenizer's {value}")
    config.mlm[key] = value
  return config


def input_spec(
  config: ml_collections.ConfigDict, batch_size: int
) -> dict[str, jax.ShapeDtypeStruct]:
  """Global shapes and dtypes of a batch of the input pipeline (see docs/architecture.md)."""
  size, length = int(config.data.image_size), int(config.data.max_len)
  image = jax.ShapeDtypeStruct((batch_size, size, size, 3), np.float32)
  specs = {
    "image": image,
    "image_aug": image,
    "text_ids": jax.ShapeDtypeStruct((batch_size, length), np.int32),
    "text_mask": jax.ShapeDtypeStruct((batch_size, length), np.int32),
    "image_id": jax.ShapeDtypeStruct((batch_size,), np.int32),
  }
  return {key: specs[key] for key in pipeline.train_batch_keys(config.data)}


def check_batch(local: dict[str, np.ndarray], spec: dict[str, Any]) -> None:
  """Clear error when the pipeline's batch does not match what the step was compiled for."""
  per_process = spec["image"].shape[0] // jax.process_count()
  for key, want in spec.items():
    got = local.get(key)
    if got is None or tuple(got.shape) != (per_process, *want.shape[1:]) or got.dtype != want.dtype:
      desc = None if got is None else (tuple(got.shape), str(got.dtype))
      raise ValueError(f"input batch[{key!r}] is {desc}, the step expects {want} per process")


def make_init_fn(model, tx, spec: dict[str, Any], config=None) -> Callable[[jax.Array], Any]:
  """`init(rng) -> TrainState`, building dummy inputs inside so that jit sees no host data."""

  def init(rng):
    dummy = {k: jnp.zeros((2, *v.shape[1:]), v.dtype) for k, v in spec.items()}
    return step_lib.init_state(model, tx, dummy, rng, config)

  return init


class Setup(NamedTuple):
  """What a run is built from: everything but data and state values."""

  config: Any  # the config the step was built from (`resolve_mlm` applied)
  mesh: Any
  tokenizer: Any
  model: Any
  tx: Any
  schedule: Any
  spec: dict[str, Any]
  abstract_state: Any  # ShapeDtypeStructs carrying the target shardings
  state_shardings: Any
  init_fn: Callable[[jax.Array], Any]
  train_step: Any  # jitted, not yet compiled


def build(config: ml_collections.ConfigDict) -> Setup:
  """Validates the config and builds mesh, tokenizer, model, optimizer, abstract state and step."""
  validate_config(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  tokenizer = build_tokenizer(config.data)
  if tokenizer.vocab_size > config.model.text.vocab_size:
    raise ValueError(
      f"the tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size="
      f"{config.model.text.vocab_size}; raise model.text.vocab_size"
    )
  config = resolve_mlm(config, tokenizer)
  model = build_model(config.model)
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
  spec = input_spec(config, config.batch_size)
  init_fn = make_init_fn(model, tx, spec, config)
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  state_shardings = sharding.state_shardings(abstract, mesh)
  batch_shardings = {k: sharding.batch_sharding(mesh) for k in spec}
  train_step = jax.jit(
    step_lib.make_train_step(model, tx, config, schedule),
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
  return Setup(
    config=config,
    mesh=mesh,
    tokenizer=tokenizer,
    model=model,
    tx=tx,
    schedule=schedule,
    spec=spec,
    abstract_state=ckpt_lib.abstract_with_shardings(abstract, state_shardings),
    state_shardings=state_shardings,
    init_fn=init_fn,
    train_step=train_step,
  )


def lower_step(setup: Setup) -> Any:
  """Lowers the train step on abstract inputs (no device memory is used)."""
  with jax.set_mesh(setup.mesh):
    return setup.train_step.lower(setup.abstract_state, setup.spec)


def log_memory_analysis(compiled: Any) -> dict[str, float]:
  """Logs (and returns, in MiB) what XLA reports for the compiled step."""
  try:
    analysis = compiled.memory_analysis()
  except Exception as e:  # noqa: BLE001 - some backends do not implement it.
    logging.info("memory analysis unavailable: %s", e)
    return {}
  if analysis is None:
    return {}
  fields = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "temp_size_in_bytes",
    "alias_size_in_bytes",
    "generated_code_size_in_bytes",
  )
  mib = {f.replace("_in_bytes", "_mib"): getattr(analysis, f, 0) / 2**20 for f in fields}
  logging.info("compiled train step memory (per device, MiB): %s", mib)
  return mib


class EncodeFns:
  """Jitted, mesh-aware model functions for evaluators: host numpy in, host numpy out.

  `image` / `text` give `[B, E]` embeddings. Models with an ITM head (`fuse`, `itm_logits`) also
  get `image_tokens` / `text_tokens` (embeddings plus the tokens the fusion encoder reads) and
  `itm_score` (the "match" logit of each pair), for the `retrieval_itm` evaluator.
  """

  def __init__(self, model, mesh):
    cls = type(model)
    rep = sharding.replicated(mesh)
    self._mesh = mesh
    self.has_itm = hasattr(cls, "itm_logits")

    def image_outputs(p, images):
      return model.apply(p, images, method=cls.encode_image)

    def text_outputs(p, ids, mask):
      return model.apply(p, ids, mask, method=cls.encode_text)

    self._image = jax.jit(lambda p, x: image_outputs(p, x)["img/emb"], out_shardings=rep)
    self._text = jax.jit(
      lambda p, ids, mask: text_outputs(p, ids, mask)["txt/emb"], out_shardings=rep
    )
    if self.has_itm:

      def with_image_tokens(p, images):
        out = image_outputs(p, images)
        return out["img/emb"], out["img/all_tokens"]

      def with_text_tokens(p, ids, mask):
        out = text_outputs(p, ids, mask)
        return out["txt/emb"], out["txt/tokens"]

      def itm_score(p, image_tokens, text_tokens, text_mask):
        def score(module):
          return module.itm_logits(module.fuse(text_tokens, text_mask, image_tokens))[:, 1]

        return model.apply(p, method=score)

      self._image_tokens = jax.jit(with_image_tokens, out_shardings=rep)
      self._text_tokens = jax.jit(with_text_tokens, out_shardings=rep)
      self._itm_score = jax.jit(itm_score, out_shardings=rep)

  def _put(self, x: np.ndarray) -> jax.Array:
    n = sharding.num_batch_shards(self._mesh)
    target = (
      sharding.batch_sharding(self._mesh) if len(x) % n == 0 else sharding.replicated(self._mesh)
    )
    return jax.device_put(x, target)

  def image(self, params, images: np.ndarray) -> np.ndarray:
    return np.asarray(self._image(params, self._put(images)))

  def text(self, params, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(self._text(params, self._put(ids), self._put(mask)))

  def image_tokens(self, params, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(emb [B, E], tokens [B, 1+N, Di])`."""
    return jax.device_get(self._image_tokens(params, self._put(images)))

  def text_tokens(self, params, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(emb [B, E], tokens [B, L, Dt])`."""
    return jax.device_get(self._text_tokens(params, self._put(ids), self._put(mask)))

  def itm_score(self, params, image_tokens, text_tokens, text_mask) -> np.ndarray:
    """`[n]` ITM "match" logits of the pairs (image_tokens[i], text_tokens[i])."""
    args = (self._put(image_tokens), self._put(text_tokens), self._put(text_mask))
    return np.asarray(self._itm_score(params, *args))


def build_evaluators(config, model, mesh, tokenizer) -> dict[str, Any]:
  if not config.get("evals"):
    return {}
  encode = EncodeFns(model, mesh)
  batch_size = int(config.get("eval_batch_size", 256))
  n = sharding.num_batch_shards(mesh)
  batch_size = max(n, batch_size - batch_size % n)
  return evaluation.build_evaluators(
    config.evals,
    encode_image_fn=encode.image,
    encode_text_fn=encode.text,
    encode_image_tokens_fn=encode.image_tokens if encode.has_itm else None,
    encode_text_tokens_fn=encode.text_tokens if encode.has_itm else None,
    itm_score_fn=encode.itm_score if encode.has_itm else None,
    tokenizer=tokenizer,
    data_config=config.data,
    default_batch_size=batch_size,
  )


def run_evaluators(evaluators: dict, params, step: int, final: bool) -> dict[str, float]:
  """Runs the evaluators due at `step` (all when `final`); returns `eval/<name>/<metric>`."""
  out = {}
  for name, ev in evaluators.items():
    due = final or (ev.every_steps > 0 and step % ev.every_steps == 0)
    if not due:
      continue
    start = time.perf_counter()
    results = ev.run(params)
    logging.info("eval %s at step %d (%.1fs): %s", name, step, time.perf_counter() - start, results)
    out.update({f"eval/{name}/{k}": float(v) for k, v in results.items()})
  return out


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so the run saves and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not in the main thread: leave signals alone.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping after this step")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _write_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and evaluates at the end.

  Returns the final metrics (last logged train metrics and final eval metrics).
  """
  workdir = os.path.abspath(workdir)
  setup = build(config)
  mesh = setup.mesh
  os.makedirs(workdir, exist_ok=True)
  _write_config(config, workdir)

  train_ds = pipeline.make_train_dataset(
    config.data, setup.tokenizer, global_batch_size=config.batch_size, seed=config.seed
  )
  data_iter = iter(train_ds)

  ckpt = ckpt_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    keep=int(config.get("keep_checkpoints", 3)),
    keep_period=int(config.get("keep_period", 0)) or None,
  )
  latest = ckpt.latest_step()
  if latest is not None:
    state = ckpt.restore(latest, setup.abstract_state, data_iter)
    logging.info("resumed from step %d in %s", latest, ckpt.directory)
  else:
    rng = jax.random.PRNGKey(config.seed)
    state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)(rng)

  compile_start = time.perf_counter()
  compiled_step = lower_step(setup).compile()
  logging.info("compiled the train step in %.1fs", time.perf_counter() - compile_start)
  log_memory_analysis(compiled_step)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state.params))
  logging.info(
    "model %s: %.2fM parameters", config.model.get("name", "two_tower"), num_params / 1e6
  )

  evaluators = build_evaluators(config, setup.model, mesh, setup.tokenizer)
  writer = metrics_lib.MetricWriter(workdir)
  total = int(config.total_steps)
  step = start_step = int(jax.device_get(state.step))
  progress = metrics_lib.Progress(total, config.batch_size, step)
  last_good = step
  final_metrics: dict[str, float] = {}
  log_every = int(config.get("log_every", 50))
  ckpt_every = int(config.get("checkpoint_every", 1000))

  batch_sharding = sharding.batch_sharding(mesh)
  try:
    with _Preemption() as preemption, jax.set_mesh(mesh):
      while step < total:
        local = next(data_iter)
        if step == start_step:
          check_batch(local, setup.spec)
        batch = pipeline.to_global_batch(local, batch_sharding)
        state, step_metrics = compiled_step(state, batch)
        step += 1
        preempted = preemption.requested or ckpt.manager.reached_preemption(step)
        save_now = step % ckpt_every == 0 or step == total or preempted
        if step % log_every == 0 or step == total or save_now:
          host = {f"train/{k}": v for k, v in metrics_lib.to_floats(step_metrics).items()}
          metrics_lib.check_finite(host, last_good, step)
          last_good = step
          if step % log_every == 0 or step == total:
            host.update({f"perf/{k}": v for k, v in progress.update(step).items()})
            writer.write(step, host)
            logging.info(metrics_lib.progress_line(step, total, host))
            final_metrics.update(host)
        if save_now:
          ckpt.save(step, state, data_iter, force=True)
        eval_metrics = run_evaluators(evaluators, state.params, step, final=step == total)
        if eval_metrics:
          writer.write(step, eval_metrics)
          final_metrics.update(eval_metrics)
          progress.reset_clock(step)
        if preempted and step < total:
          logging.warning("stopping at step %d after preemption; rerun to resume", step)
          break
  finally:
    ckpt.close()
    writer.close()

  if step == total and evaluators and jax.process_index() == 0:
    evals = {
      name: {
        k.split("/", 2)[2]: v for k, v in final_metrics.items() if k.startswith(f"eval/{name}/")
      }
      for name in evaluators
    }
    paths = report.write_report(evals, workdir, step, header=f"{config.get('name', '')} {workdir}")
    logging.info("wrote %s", paths)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({"step": step, **final_metrics}, f, indent=2)
  return final_metrics
