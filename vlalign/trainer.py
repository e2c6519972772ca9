"""The training loop: sharded state, jitted step, checkpoints, periodic evaluation, metrics.

`train_and_evaluate(config, workdir)` is the library entry point; `vlalign.train` is its binary.
Nothing here depends on the method: what a method adds (state, hooks, prediction functions) comes
through `vlalign.methods`, what a loss reads through `vlalign.losses.LossContext`.
"""

import json
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
from vlalign import evaluation, optim, pytrees, registry, sharding, weights
from vlalign import losses as losses_lib
from vlalign import metrics as metrics_lib
from vlalign import step as step_lib
from vlalign import workdir as workdir_lib
from vlalign.data import pipeline
from vlalign.data.tokenizer import build_tokenizer
from vlalign.evaluation import report
from vlalign.methods import build_method
from vlalign.models import build_model

REQUIRED_FIELDS = (
  "method",
  "total_steps",
  "batch_size",
  "model",
  "data",
  "optim",
  "losses",
  "mesh",
)
# Top-level fields every run may have; a method adds the sections it reads (`config_fields`).
GENERIC_FIELDS = (
  *REQUIRED_FIELDS,
  "name",
  "variant",
  "seed",
  "log_every",
  "checkpoint_every",
  "keep_checkpoints",
  "keep_period",
  "eval_batch_size",
  "evals",
  "init",
  "imports",
)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for configs that cannot run, before anything is built (generic fields only;
  the method validates its own sections)."""
  missing = [f for f in REQUIRED_FIELDS if f not in config]
  if missing:
    raise ValueError(f"config lacks required fields: {missing}")
  for field in ("total_steps", "batch_size", "log_every", "checkpoint_every"):
    if int(config.get(field, 1)) <= 0:
      raise ValueError(f"config.{field}={config.get(field)} must be > 0")


def check_sections(config: ml_collections.ConfigDict, method: Any) -> None:
  """A top-level config field that neither the run nor its method reads is an error."""
  known = set(GENERIC_FIELDS) | set(method.config_fields)
  unused = sorted(k for k in config if k not in known and config[k] is not None)
  if unused:
    raise ValueError(
      f"config fields {unused} are not read by method {config.method!r} (it reads "
      f"{sorted(method.config_fields) or 'no extra section'}); remove them or pick the method "
      "that uses them"
    )


class Setup(NamedTuple):
  """What a run is built from: everything but data and state values."""

  config: Any
  mesh: Any
  tokenizer: Any
  model: Any
  method: Any
  tx: Any
  schedule: Any
  spec: dict[str, Any]  # global ShapeDtypeStructs of a train batch
  frozen: Any  # boolean pytree like the params (True: never updated), or None
  abstract_state: Any  # ShapeDtypeStructs carrying the target shardings
  state_shardings: Any
  init_params: Callable[[jax.Array], Any]
  init_state: Callable[[Any, jax.Array], Any]
  step_fn: Callable[..., Any]  # the pure `train_step(state, batch)`, not jitted
  train_step: Any  # `step_fn` jitted with the shardings and donation, not yet compiled


def build(config: ml_collections.ConfigDict) -> Setup:
  """Validates the config and builds mesh, tokenizer, model, method, optimizer, abstract state and
  the jitted step."""
  registry.import_modules(config.get("imports") or ())
  validate_config(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  tokenizer = build_tokenizer(config.data)
  vocab_size = config.model.text.get("vocab_size")
  if vocab_size is not None and tokenizer.vocab_size > vocab_size:
    raise ValueError(
      f"the tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size="
      f"{vocab_size}; raise model.text.vocab_size"
    )
  model = build_model(config.model)
  method = build_method(config, model, tokenizer)
  check_sections(config, method)
  weights.check_init_config(config.get("init"))
  loss_entries = losses_lib.parse_entries(config.losses)
  spec = pipeline.train_batch_spec(config.data, config.batch_size)

  def example_batch():
    return {k: jnp.zeros((2, *v.shape[1:]), v.dtype) for k, v in spec.items()}

  init_params = step_lib.make_params_init(model, example_batch)
  abstract_params = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  frozen_patterns = (*config.optim.get("frozen", ()), *method.frozen_patterns())
  frozen = optim.frozen_mask(abstract_params, frozen_patterns)
  tx, schedule = optim.make_optimizer(config.optim, int(config.total_steps), frozen)
  init_state = step_lib.make_state_init(method, tx)
  abstract = jax.eval_shape(init_state, abstract_params, jax.random.PRNGKey(0))
  state_shardings = sharding.state_shardings(abstract, mesh)
  batch_shardings = {k: sharding.batch_sharding(mesh) for k in spec}
  step_fn = step_lib.make_train_step(method, tx, loss_entries, schedule, frozen)
  train_step = jax.jit(
    step_fn,
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
  return Setup(
    config=config,
    mesh=mesh,
    tokenizer=tokenizer,
    model=model,
    method=method,
    tx=tx,
    schedule=schedule,
    spec=spec,
    frozen=frozen,
    abstract_state=ckpt_lib.abstract_with_shardings(abstract, state_shardings),
    state_shardings=state_shardings,
    init_params=init_params,
    init_state=init_state,
    step_fn=step_fn,
    train_step=train_step,
  )


def fresh_state(setup: Setup, rng: jax.Array) -> Any:
  """A new TrainState on its shardings: parameters initialised (and replaced where `config.init`
  says), then the optimizer state and the method's extras made from them."""
  param_shardings = setup.state_shardings.params
  params = jax.jit(setup.init_params, out_shardings=param_shardings)(rng)
  params = weights.apply_init(setup.config.get("init"), params, setup.abstract_state.params)
  make_state = jax.jit(setup.init_state, out_shardings=setup.state_shardings, donate_argnums=(0,))
  return make_state(params, rng)


def describe_params(abstract_params: Any, frozen: Any) -> str:
  """`"12.34M parameters, 10.00M trainable; frozen: text_encoder (2.34M)"`: the frozen part by
  top-level sub-tree."""
  named = pytrees.named_leaves(abstract_params)
  flags = jax.tree.leaves(frozen) if frozen is not None else [False] * len(named)
  total, frozen_by_tree = 0, {}
  for (name, leaf), is_frozen in zip(named.items(), flags, strict=True):
    size = int(np.prod(leaf.shape))
    total += size
    if is_frozen:
      top = pytrees.param_name(name).split("/")[0]
      frozen_by_tree[top] = frozen_by_tree.get(top, 0) + size
  frozen_total = sum(frozen_by_tree.values())
  line = f"{total / 1e6:.2f}M parameters, {(total - frozen_total) / 1e6:.2f}M trainable"
  if frozen_by_tree:
    parts = ", ".join(f"{k} ({v / 1e6:.2f}M)" for k, v in frozen_by_tree.items())
    line += f"; frozen: {parts}"
  return line


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


def check_batch(local: dict[str, np.ndarray], spec: dict[str, Any]) -> None:
  """Clear error when the pipeline's batch does not match what the step was compiled for."""
  global_batch = next(iter(spec.values())).shape[0]
  per_process = global_batch // jax.process_count()
  for key, want in spec.items():
    got = local.get(key)
    if got is None or tuple(got.shape) != (per_process, *want.shape[1:]) or got.dtype != want.dtype:
      desc = None if got is None else (tuple(got.shape), str(got.dtype))
      raise ValueError(f"input batch[{key!r}] is {desc}, the step expects {want} per process")


def build_evaluators(setup: Setup) -> dict[str, Any]:
  """The evaluators of `config.evals`, calling the method's prediction functions on the mesh."""
  config = setup.config
  if not config.get("evals"):
    return {}
  predict = {
    name: sharding.host_fn(fn, setup.mesh) for name, fn in setup.method.predict_fns().items()
  }
  batch_size = int(config.get("eval_batch_size", 256))
  n = sharding.num_batch_shards(setup.mesh)
  batch_size = max(n, batch_size - batch_size % n)
  return evaluation.build_evaluators(
    config.evals,
    predict=predict,
    tokenizer=setup.tokenizer,
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


def _write_config(config, workdir) -> None:
  if jax.process_index() == 0:
    workdir_lib.write_text(workdir / workdir_lib.CONFIG, config.to_json_best_effort(indent=2))


def _eval_results(final_metrics: dict[str, float], names) -> dict[str, dict[str, float]]:
  """`{evaluator: {metric: value}}` from `eval/<evaluator>/<metric>` keys."""
  return {
    name: {k.split("/", 2)[2]: v for k, v in final_metrics.items() if k.startswith(f"eval/{name}/")}
    for name in names
  }


def _finished_run(setup: Setup, workdir, step: int, params) -> dict[str, float]:
  """A rerun of a run that already reached `total_steps`: its results stay as they are. Only if the
  final results are missing (a crash after the last checkpoint) are they made, from `params`."""
  final_path = workdir / workdir_lib.FINAL_METRICS
  if final_path.exists():
    logging.info("%s already finished at step %d; results in %s", workdir, step, final_path)
    final = json.loads(final_path.read_text())
    final.pop("step", None)
    return final
  logging.info("%s finished at step %d without final results: evaluating now", workdir, step)
  final = _logged_metrics(workdir, step)
  evaluators = build_evaluators(setup)
  with jax.set_mesh(setup.mesh):
    final.update(run_evaluators(evaluators, params, step, final=True))
  _write_results(setup.config, workdir, step, final, evaluators)
  return final


def _logged_metrics(workdir, step: int) -> dict[str, float]:
  """The train and perf metrics logged at `step` in the workdir's metrics file (if any)."""
  path = workdir / workdir_lib.METRICS
  rows = metrics_lib.read_jsonl(path) if path.exists() else []
  logged = {}
  for row in rows:
    if row["step"] == step:
      logged.update({k: v for k, v in row.items() if k.startswith(("train/", "perf/"))})
  return logged


def _write_results(config, workdir, step: int, final: dict[str, float], evaluators) -> None:
  if jax.process_index() != 0:
    return
  if evaluators:
    evals = _eval_results(final, evaluators)
    paths = report.write_report(evals, workdir, step, header=f"{config.get('name', '')} {workdir}")
    logging.info("wrote %s", paths)
  payload = json.dumps({"step": step, **final}, indent=2, sort_keys=True)
  workdir_lib.write_text(workdir / workdir_lib.FINAL_METRICS, payload)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and evaluates at the end.

  Returns the final metrics (last logged train metrics and final eval metrics).
  """
  workdir = workdir_lib.as_path(workdir)
  setup = build(config)
  mesh = setup.mesh
  logging.info("model %s: %s", type(setup.model).__name__, describe_params(
    setup.abstract_state.params, setup.frozen))  # fmt: skip
  workdir.mkdir(parents=True, exist_ok=True)
  _write_config(config, workdir)

  train_ds = pipeline.make_train_dataset(
    config.data, setup.tokenizer, global_batch_size=config.batch_size, seed=config.seed
  )
  data_iter = iter(train_ds)

  ckpt = ckpt_lib.Checkpointer(
    str(workdir / workdir_lib.CHECKPOINTS),
    keep=int(config.get("keep_checkpoints", 3)),
    keep_period=int(config.get("keep_period", 0)) or None,
  )
  latest = ckpt.latest_step()
  if latest is not None:
    state = ckpt.restore(latest, setup.abstract_state, data_iter)
    logging.info("resumed from step %d in %s", latest, ckpt.directory)
  else:
    state = fresh_state(setup, jax.random.PRNGKey(config.seed))
  total = int(config.total_steps)
  step = start_step = int(jax.device_get(state.step))
  if step >= total:
    ckpt.close()
    return _finished_run(setup, workdir, step, state.params)

  compile_start = time.perf_counter()
  compiled_step = lower_step(setup).compile()
  logging.info("compiled the train step in %.1fs", time.perf_counter() - compile_start)
  log_memory_analysis(compiled_step)

  evaluators = build_evaluators(setup)
  writer = metrics_lib.MetricWriter(str(workdir))
  writer.drop_after(step)
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

  if step == total:
    _write_results(config, workdir, step, final_metrics, evaluators)
  return final_metrics
