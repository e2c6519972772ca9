"""The training loop: sharded state, jitted step, checkpoints, periodic evaluation, metrics.

`train_and_evaluate(config, workdir)` is the library entry point; `vlalign.train` is its binary.
Nothing here depends on the method: what a method adds (state, hooks, prediction functions) comes
through `vlalign.methods`, what a loss reads through `vlalign.losses.LossContext`.
"""

import contextlib
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
from jax.experimental import multihost_utils

from vlalign import checkpoint as ckpt_lib
from vlalign import errors, evaluation, optim, perf, pytrees, registry, sharding, weights
from vlalign import losses as losses_lib
from vlalign import metrics as metrics_lib
from vlalign import step as step_lib
from vlalign import workdir as workdir_lib
from vlalign.data import pipeline
from vlalign.data.tokenizer import build_tokenizer
from vlalign.errors import ConfigError, UserError
from vlalign.evaluation import report
from vlalign.methods import build_method
from vlalign.models import build_model, scan

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
  "loss_group_size",
)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for configs that cannot run, before anything is built (generic fields only;
  the method validates its own sections)."""
  missing = [f for f in REQUIRED_FIELDS if f not in config]
  if missing:
    raise ConfigError(f"config lacks required fields: {missing}")
  for field in ("total_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
    if int(config.get(field, 1)) <= 0:
      raise ConfigError(f"config.{field}={config.get(field)} must be > 0")
  if int(config.get("keep_period", 0)) < 0:
    raise ConfigError(f"config.keep_period={config.keep_period} must be >= 0 (0: off)")


def check_sections(config: ml_collections.ConfigDict, method: Any) -> None:
  """A top-level config field that neither the run nor its method reads is an error."""
  known = set(GENERIC_FIELDS) | set(method.config_fields)
  unused = sorted(k for k in config if k not in known and config[k] is not None)
  if unused:
    raise ConfigError(
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
  loss_probe: Any  # jitted `(state, batch) -> metrics` of the state's own parameters, no update
  warnings: tuple[str, ...]  # settings that run but make some numbers meaningless


def build(config: ml_collections.ConfigDict, data: bool = True) -> Setup:
  """Validates the config and builds mesh, tokenizer, model, method, optimizer, abstract state and
  the jitted step; with `data`, also checks the data (`check_data`: the paths exist, the splits
  fill a batch and the evaluators' recalls). Without, nothing of the datasets is read (compiling a
  pod config on a machine without its data)."""
  registry.import_modules(config.get("imports") or ())
  validate_config(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  tokenizer = build_tokenizer(config.data)
  vocab_size = config.model.text.get("vocab_size")
  if vocab_size is not None and tokenizer.vocab_size > vocab_size:
    raise ConfigError(
      f"the tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size="
      f"{vocab_size}; raise model.text.vocab_size"
    )
  pipeline.check_text_lengths(config.data, config.model.text)
  model = build_model(config.model)
  method = build_method(config, model, tokenizer)
  check_sections(config, method)
  weights.check_init_config(config.get("init"))
  loss_entries = losses_lib.parse_entries(config.losses)
  group_size = losses_lib.groups.group_size_of(config)
  spec = pipeline.train_batch_spec(config.data, config.batch_size)
  warnings = check_data(config, tokenizer, method) if data else []

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
  step_fn = step_lib.make_train_step(method, tx, loss_entries, schedule, frozen, group_size)
  train_step = jax.jit(
    step_fn,
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
  loss_probe = jax.jit(
    step_lib.make_loss_probe(method, loss_entries, group_size),
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=sharding.replicated(mesh),
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
    loss_probe=loss_probe,
    warnings=tuple(warnings),
  )


def check_data(config: ml_collections.ConfigDict, tokenizer: Any, method: Any) -> list[str]:
  """Checks, before anything is compiled (and by --dry_run), that the data can give meaningful
  numbers: the train split fills a batch, every evaluator's settings and split are valid (recall@k
  needs k candidates), the method provides what the evaluators call. Returns warnings (captions
  that `data.max_len` cuts), which are also logged."""
  pipeline.check_train_split(config.data, int(config.batch_size), jax.process_count())
  if config.get("evals"):
    evaluation.build_evaluators(
      config.evals,
      predict=method.predict_fns(),
      tokenizer=tokenizer,
      data_config=config.data,
      default_batch_size=1,
      check_only=True,
    )
  warnings = []
  fraction, longest = pipeline.truncated_fraction(config.data, tokenizer)
  if fraction > 0:
    warnings.append(
      f"data.max_len={config.data.max_len} cuts {100 * fraction:.1f}% of the train captions "
      f"(sampled; the longest has {longest} tokens with [CLS] and [EOS])"
    )
  for warning in warnings:
    logging.warning(warning)
  return warnings


def fresh_state(setup: Setup, rng: jax.Array) -> Any:
  """A new TrainState on its shardings: parameters initialised (and replaced where `config.init`
  says), then the optimizer state and the method's extras made from them."""
  param_shardings = setup.state_shardings.params
  params = jax.jit(setup.init_params, out_shardings=param_shardings)(rng)
  params = weights.apply_init(
    setup.config.get("init"), params, setup.abstract_state.params, setup.config.model
  )
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


def step_flops(setup: Setup, lowered: Any, compiled: Any) -> float | None:
  """FLOPs per device of one train step (`perf.step_flops` of `compiled`, XLA's count), given the
  step's `lowered` program (`lower_step`) and its compiled executable.

  XLA's cost analysis counts a loop's body once, so for a model with scanned layers
  (`model.scan_layers`) the compiled count misses all layers but one of each tower. The step is
  then lowered once more, abstractly, with the scans traced unrolled (`scan.unrolled_scans`, the
  same function and parameters). The difference of the two lowered (unpartitioned, global)
  programs' counts is what the loops' other iterations compute; split over the devices (the
  blocks are data-parallel: each device runs its share of the batch), it is added to the compiled
  count (within ~1% of the unrolled step's compiled count, tests/test_scan.py). Lowering only: no
  second compile."""
  flops = perf.step_flops(compiled)
  if flops is None or not setup.config.model.get("scan_layers"):
    return flops
  scanned = perf.step_flops(lowered)
  with scan.unrolled_scans(), jax.set_mesh(setup.mesh):
    # A fresh function object, so that jax traces again instead of reusing the scanned trace.
    unrolled_step = jax.jit(lambda state, batch: setup.step_fn(state, batch))
    unrolled = perf.step_flops(unrolled_step.lower(setup.abstract_state, setup.spec))
  if scanned is None or unrolled is None:
    return None
  return flops + (unrolled - scanned) / jax.device_count()


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


def skipped_examples(counts: np.ndarray | None) -> float:
  """Train examples dropped so far (unreadable images, empty captions) over all processes, from
  this process's batch counts `[b]` (`pipeline.SKIPPED_KEY`; the last is the newest)."""
  local = 0 if counts is None or len(counts) == 0 else int(np.max(counts))
  if jax.process_count() == 1:
    return float(local)
  return float(np.sum(multihost_utils.process_allgather(np.int64(local))))


def build_evaluators(setup: Setup, output_dir: Any = None) -> dict[str, Any]:
  """The evaluators of `config.evals`, calling the method's prediction functions on the mesh;
  those that write files (plots) write them into `output_dir` (process 0 only)."""
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
    output_dir=output_dir if jax.process_index() == 0 else None,
  )


def run_evaluators(evaluators: dict, params, step: int, final: bool) -> dict[str, float]:
  """Runs the evaluators due at `step` (all when `final`); returns `eval/<name>/<metric>`."""
  out = {}
  for name, ev in evaluators.items():
    due = final or (ev.every_steps > 0 and step % ev.every_steps == 0)
    if not due:
      continue
    start = time.perf_counter()
    results = ev.run(params, step=step)
    logging.info("eval %s at step %d (%.1fs): %s", name, step, time.perf_counter() - start, results)
    out.update({f"eval/{name}/{k}": float(v) for k, v in results.items()})
  return out


PROFILE_DIR = "profile"


def parse_profile_steps(text: str | None) -> tuple[int, int] | None:
  """`"FIRST,LAST"` (or `"N"`: one step) -> `(FIRST, LAST)`, 1-based train steps as logged,
  `1 <= FIRST <= LAST`; None or "" -> None. UserError on anything else."""
  if not text:
    return None
  try:
    parts = [int(p) for p in text.split(",")]
  except ValueError:
    parts = []
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
    raise UserError(
      f"--profile_steps={text!r}: give FIRST,LAST with 1 <= FIRST <= LAST, e.g. 10,15"
    )
  return parts[0], parts[1]


class StepProfiler:
  """Traces train steps `first..last` (1-based as logged, inclusive; with the input batch each
  one fetches) with `jax.profiler` into `directory`, one `StepTraceAnnotation` per step, for
  TensorBoard's profile plugin or XProf (`<directory>/plugins/profile/<run>/<host>.xplane.pb`).
  Profiling never stops a run: a trace that fails to start or stop is a logged warning and no
  more profiling. The loop calls `begin(step)` before fetching the batch of `step` and
  `end(step, outputs)` after dispatching it; `close()` stops a trace cut short."""

  def __init__(self, steps: tuple[int, int] | None, directory: Any):
    self.first, self.last = steps or (1, 0)
    self.directory = str(directory)
    self.done = steps is None
    self.tracing = False
    self._annotation = None

  def begin(self, step: int) -> None:
    if self.done or not self.first <= step <= self.last:
      return
    if not self.tracing:
      try:
        jax.profiler.start_trace(self.directory)
      except Exception as e:  # noqa: BLE001 - a profiler problem must not end the run.
        logging.warning("profiling off: could not start the trace in %s: %s", self.directory, e)
        self.done = True
        return
      self.tracing = True
      logging.info("profiling steps %d-%d into %s", step, self.last, self.directory)
    self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
    self._annotation.__enter__()

  def end(self, step: int, outputs: Any) -> None:
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None
    if self.tracing and step >= self.last:
      jax.block_until_ready(outputs)  # The trace holds the whole of the last step.
      self.close()

  def close(self) -> None:
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None
    if not self.tracing:
      return
    self.tracing, self.done = False, True
    try:
      jax.profiler.stop_trace()
    except Exception as e:  # noqa: BLE001 - a profiler problem must not end the run.
      logging.warning("profiling: could not write the trace to %s: %s", self.directory, e)
      return
    logging.info("wrote the profile to %s (tensorboard --logdir=%s)", self.directory,
                 self.directory)  # fmt: skip


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


class _StopSignals:
  """SIGTERM (preemption, `scancel`), SIGINT (Ctrl-C) and SIGQUIT (Ctrl-\\) become a request the
  loop checks after each step: it saves a checkpoint and stops. After the first signal the default
  handlers are back, so a second Ctrl-C stops at once, without saving."""

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def __enter__(self):
    for signum in STOP_SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # Not in the main thread: leave signals alone.
        break
    return self

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame):
    del frame
    if self.signum is None:
      self.signum = signum
      logging.warning(
        "%s received: saving a checkpoint and stopping after this step (again: stop at once)",
        signal.Signals(signum).name,
      )
    self._restore()

  def _restore(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def __exit__(self, *exc):
    self._restore()


class Interrupted(UserError):
  """The run stopped on SIGINT or SIGQUIT after saving; the binary exits with 128 + signum, as a
  shell expects of a process stopped by that signal."""

  def __init__(self, signum: int, step: int, saved: int | None):
    name = signal.Signals(signum).name
    where = f"checkpoint {saved} saved" if saved is not None else "nothing to save yet"
    super().__init__(
      f"stopped by {name} at step {step} ({where}); rerun the same command to resume"
    )
    self.exit_code = 128 + signum


def _eval_results(final_metrics: dict[str, float], names) -> dict[str, dict[str, float]]:
  """`{evaluator: {metric: value}}` from `eval/<evaluator>/<metric>` keys."""
  return {
    name: {k.split("/", 2)[2]: v for k, v in final_metrics.items() if k.startswith(f"eval/{name}/")}
    for name in names
  }


def _final_path(workdir, tag: str):
  return workdir / workdir_lib.FINAL_METRICS.replace(".json", f"{tag}.json")


def _finished_run(setup: Setup, workdir, step: int, params, tag: str) -> dict[str, float]:
  """A rerun of a run that already reached `total_steps`: its results stay as they are. Only if the
  final results are missing (a crash after the last checkpoint) are they made, from `params`."""
  final_path = _final_path(workdir, tag)
  if final_path.exists():
    logging.info("%s already finished at step %d; results in %s", workdir, step, final_path)
    final = json.loads(final_path.read_text())
    final.pop("step", None)
    return final
  logging.info("%s finished at step %d without final results: evaluating now", workdir, step)
  final = _logged_metrics(workdir, step)
  evaluators = build_evaluators(setup, workdir)
  with jax.set_mesh(setup.mesh):
    final.update(run_evaluators(evaluators, params, step, final=True))
  _write_results(setup.config, workdir, step, final, evaluators, tag)
  return final


def _logged_metrics(workdir, step: int) -> dict[str, float]:
  """The train, perf and data metrics logged at `step` in the workdir's metrics file (if any)."""
  path = workdir / workdir_lib.METRICS
  rows = metrics_lib.read_jsonl(path) if path.exists() else []
  logged = {}
  for row in rows:
    if row["step"] == step:
      logged.update({k: v for k, v in row.items() if k.startswith(("train/", "perf/", "data/"))})
  return logged


def _write_results(config, workdir, step: int, final: dict, evaluators, tag: str) -> None:
  if jax.process_index() != 0:
    return
  if evaluators:
    evals = _eval_results(final, evaluators)
    header = f"{config.get('name', '')} {workdir}"
    paths = report.write_report(evals, workdir, step, header=header, tag=tag)
    logging.info("wrote %s", paths)
  payload = json.dumps({"step": step, **final}, indent=2, sort_keys=True)
  workdir_lib.write_text(_final_path(workdir, tag), payload)


def _all_processes_agree(ok: bool) -> bool:
  """Process 0's `ok`, on every process (a no-op with one process)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.asarray(ok, np.int32)))


@contextlib.contextmanager
def workdir_lock(workdir):
  """Process 0 holds the workdir's exclusive lock for the run; every process learns whether it
  got it (a WorkdirError on all of them otherwise)."""
  lock, error = None, None
  if jax.process_index() == 0:
    lock = workdir_lib.WorkdirLock(workdir)
    try:
      lock.acquire()
    except errors.WorkdirError as e:
      lock, error = None, e
  if not _all_processes_agree(error is None):
    raise error or errors.WorkdirError(f"process 0 could not lock {workdir}")
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def _restore_or_init(setup: Setup, ckpt, data_iter) -> tuple[Any, int]:
  """The newest checkpoint that reads (damaged newer ones are moved aside, with a warning), or a
  fresh state. Returns `(state, step)`."""
  step, state, damaged = ckpt.restore_latest(
    lambda s: ckpt.restore(s, setup.abstract_state, data_iter)
  )
  if damaged:
    if jax.process_index() == 0:
      for error in damaged:
        ckpt.move_aside(error.step)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("vlalign: damaged checkpoints moved aside")
      ckpt.manager.reload()
    logging.warning("resumed from step %d after skipping damaged %s", step,
                    [e.step for e in damaged])  # fmt: skip
  if step is None:
    return fresh_state(setup, jax.random.PRNGKey(setup.config.seed)), 0
  logging.info("resumed from step %d in %s", step, ckpt.directory)
  return state, step


def _resume_hint(ckpt) -> str:
  """Which checkpoint a run stopped by the NaN guard resumes from."""
  steps = ckpt.all_steps()
  if not steps:
    return "no checkpoint was saved: fix the cause (e.g. lower optim.lr) and rerun"
  return (
    f"the newest checkpoint, step {steps[-1]} ({ckpt.directory}/{steps[-1]}), holds parameters "
    "whose own loss was finite: rerun to resume from it after fixing the cause (e.g. lower "
    "optim.lr)"
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  override_tag: str | None = None,
  peak_tflops: float | None = None,
  profile_steps: tuple[int, int] | None = None,
) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming from its newest readable checkpoint) and evaluates at
  the end. Returns the final metrics (last logged train metrics and final eval metrics).

  The workdir's `config.json` is the reference: a config that differs in a field that changes
  what the run computes is a WorkdirError naming the fields, unless `override_tag` is given; then
  results go to files tagged with it and the checkpoints present at the start are never deleted.
  `peak_tflops` (per device) replaces the device's known peak in the MFU (`vlalign.perf`).
  `profile_steps` `(first, last)` traces those steps into `<workdir>/profile/` (`StepProfiler`).
  """
  workdir = workdir_lib.as_path(workdir)
  tag = workdir_lib.check_tag(override_tag)
  setup = build(config)
  logging.info("model %s: %s", type(setup.model).__name__, describe_params(
    setup.abstract_state.params, setup.frozen))  # fmt: skip
  if jax.process_index() == 0:
    workdir_lib.check_writable(workdir)
  with workdir_lock(workdir):
    return _train_locked(setup, workdir, tag, peak_tflops, profile_steps)


def _train_locked(
  setup: Setup, workdir, tag: str, peak_tflops=None, profile_steps=None
) -> dict[str, float]:
  config = setup.config
  workdir_lib.check_config_matches(workdir, config, tag, workdir_lib.OPERATIONAL_FIELDS, "train on")
  data_iter = iter(
    pipeline.make_train_dataset(
      config.data, setup.tokenizer, global_batch_size=config.batch_size, seed=config.seed
    )
  )
  ckpt = ckpt_lib.Checkpointer(
    str(workdir / workdir_lib.CHECKPOINTS),
    keep=int(config.get("keep_checkpoints", 3)),
    keep_period=int(config.get("keep_period", 0)) or None,
  )
  try:
    state, step = _restore_or_init(setup, ckpt, data_iter)
  except BaseException:
    ckpt.close()
    raise
  if tag:
    ckpt.protect_through = step  # The reference config's checkpoints are never deleted.
  config_file = workdir_lib.config_path(workdir, tag)
  if jax.process_index() == 0 and not config_file.exists():
    workdir_lib.write_text(config_file, config.to_json_best_effort(indent=2))
  total = int(config.total_steps)
  if step >= total:
    ckpt.close()
    return _finished_run(setup, workdir, step, state.params, tag)
  profiler = StepProfiler(profile_steps, workdir / PROFILE_DIR)
  return _train_loop(setup, workdir, tag, ckpt, data_iter, state, step, peak_tflops, profiler)


def _train_loop(
  setup, workdir, tag, ckpt, data_iter, state, step, peak_tflops=None, profiler=None
) -> dict[str, float]:
  config, mesh = setup.config, setup.mesh
  evaluators = build_evaluators(setup, workdir)
  compile_start = time.perf_counter()
  with perf.CacheHits() as cache:
    lowered_step = lower_step(setup)
    compiled_step = lowered_step.compile()
  cached = " (read from the persistent compilation cache)" if cache.count else ""
  logging.info("compiled the train step in %.1fs%s", time.perf_counter() - compile_start, cached)
  log_memory_analysis(compiled_step)
  cost = perf.step_cost(step_flops(setup, lowered_step, compiled_step), peak_tflops)
  del lowered_step  # the program's text is not needed while training

  total = int(config.total_steps)
  writer = metrics_lib.MetricWriter(str(workdir))
  writer.drop_after(step)
  start_step = last_checked = step
  progress = metrics_lib.Progress(
    total, config.batch_size, step, cost.flops_per_step, cost.peak.tflops
  )
  final_metrics: dict[str, float] = {}
  log_every = int(config.get("log_every", 50))
  ckpt_every = int(config.get("checkpoint_every", 1000))
  batch_sharding = sharding.batch_sharding(mesh)
  saved = None
  profiler = profiler or StepProfiler(None, "")
  try:
    with _StopSignals() as stop, jax.set_mesh(mesh):
      while step < total:
        profiler.begin(step + 1)
        local = next(data_iter)
        skipped = local.pop(pipeline.SKIPPED_KEY, None)
        if step == start_step:
          check_batch(local, setup.spec)
        batch = pipeline.to_global_batch(local, batch_sharding)
        state, step_metrics = compiled_step(state, batch)
        step += 1
        profiler.end(step, (state, step_metrics))
        stopping = stop.requested or ckpt.manager.reached_preemption(step)
        save_now = step % ckpt_every == 0 or step == total or stopping
        if step % log_every == 0 or step == total or save_now:
          host = {f"train/{k}": v for k, v in metrics_lib.to_floats(step_metrics).items()}
          metrics_lib.check_finite(host, last_checked + 1, step, "", lambda: _resume_hint(ckpt))
          last_checked = step
          if step % log_every == 0 or step == total:
            host.update({f"perf/{k}": v for k, v in progress.update(step).items()})
            host["data/skipped"] = skipped_examples(skipped)
            writer.write(step, host)
            logging.info(metrics_lib.progress_line(step, total, host))
            final_metrics.update(host)
        if save_now:
          probe = metrics_lib.to_floats(setup.loss_probe(state, batch))
          what = "in the loss of the parameters after the update (not saved)"
          metrics_lib.check_finite(probe, step, step, what, lambda: _resume_hint(ckpt))
          ckpt.save(step, state, data_iter)
          saved = step
        eval_metrics = run_evaluators(evaluators, state.params, step, final=step == total)
        if eval_metrics:
          writer.write(step, eval_metrics)
          final_metrics.update(eval_metrics)
          progress.reset_clock(step)
        if stopping and step < total:
          logging.warning("stopping at step %d; rerun the same command to resume", step)
          break
  finally:
    profiler.close()
    ckpt.close()
    writer.close()

  if step == total:
    _write_results(config, workdir, step, final_metrics, evaluators, tag)
  elif stop.signum in (signal.SIGINT, signal.SIGQUIT):
    raise Interrupted(stop.signum, step, saved)
  return final_metrics
