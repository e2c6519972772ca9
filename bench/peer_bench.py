r"""Side by side with open_clip: our CLIP train step against open_clip's own PyTorch one.

  PYTHONPATH=. .venv/bin/python bench/peer_bench.py --torch_python=/tmp/peerenv/bin/python \
      --pairs=3 --steps=20 --cpus=0,1

Both sides train the same CLIP on the same synthetic batch, in float32 on the CPU: a ViT (patch 8
on 64 px images, width 192, depth 4, 3 heads, MLP 768, CLS token with a position embedding, ln_pre,
no patch bias, LayerNorm eps 1e-5, exact GELU) and a causal text transformer (context 32, width
192, depth 4, 3 heads, EOS pooling), projections to 128 without bias, symmetric InfoNCE with a
learned temperature, AdamW (betas 0.9 / 0.98, eps 1e-6, no gradient clipping: open_clip's
defaults). open_clip's side is `open_clip.CLIP` built from a model config dict,
`open_clip.loss.ClipLoss` and `torch.optim.AdamW` with open_clip_train's two parameter groups, the
step of open_clip_train's `train_one_epoch` (forward, loss, backward, step, zero_grad, clamp of
the logit scale). Ours is the compiled `trainer.build(...).train_step` of a `configs/clip.py`
config with those sizes, on one CPU device, the batch resident on the device (as
`bench/train_bench.py` does).

Thread counts are matched by CPU affinity: each side runs in its own process, pinned with
`os.sched_setaffinity` to the same `--cpus` before it imports JAX or torch. XLA's CPU thread pool
sizes itself from the schedulable CPUs; torch gets `torch.set_num_threads(len(cpus))` (and
OMP/MKL_NUM_THREADS). The sides alternate (`--pairs` pairs, the order flipping each pair) so that
load from other jobs on a shared machine hits both; the table reports each run and the medians.

torch and open_clip_torch are not dependencies of this project: install them in a separate
virtualenv and point `--torch_python` at its interpreter; without it, only our side runs. The
open_clip side skips torchvision's C++ op registrations when they cannot load (a CUDA torchvision
wheel beside a CPU torch): open_clip imports torchvision, but CLIP uses none of its ops.

`--side=ours --profile_dir=DIR` traces `--profile_steps` more steps with jax.profiler after the
timed ones and prints where the time went, by category of XLA operation (matmuls, attention, GELU,
LayerNorm, optimizer, ...; forward and backward apart, from each operation's jax `op_name`);
`--side=torch --profile_dir=DIR` prints torch.profiler's table of the open_clip step.
`--kernels` times the step's pieces alone on both sides (matmuls of its shapes, GELU, LayerNorm,
an MLP block with three GELU forms). `--ours_set=field=value` changes our config for a what-if
(e.g. `model.image.activation=gelu_tanh`).
"""

import argparse
import ast
import gzip
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = "PEER_BENCH_RESULT "
NO_TORCH = 3  # exit status of the torch side when torch or open_clip cannot be imported


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--side", choices=("both", "ours", "torch"), default="both")
  p.add_argument(
    "--retain_host_memory",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="ours: glibc malloc keeps freed memory, as the binaries do (perf.retain_host_memory)",
  )
  p.add_argument("--torch_python", default="/tmp/peerenv/bin/python")
  p.add_argument("--pairs", type=int, default=3, help="alternating (ours, open_clip) pairs")
  p.add_argument("--steps", type=int, default=20, help="timed steps per run")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps per run (after compiling)")
  p.add_argument("--cpus", default="", help="CPU ids for both sides, e.g. 0,1 (default: all)")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--patch_size", type=int, default=8)
  p.add_argument("--width", type=int, default=192)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--heads", type=int, default=3)
  p.add_argument("--context", type=int, default=32)
  p.add_argument("--text_width", type=int, default=192)
  p.add_argument("--text_depth", type=int, default=4)
  p.add_argument("--text_heads", type=int, default=3)
  p.add_argument("--embed_dim", type=int, default=128)
  p.add_argument("--vocab_size", type=int, default=49408, help="CLIP's BPE vocabulary by default")
  p.add_argument("--lr", type=float, default=5e-4)
  p.add_argument("--weight_decay", type=float, default=0.2)
  p.add_argument(
    "--ours_set",
    action="append",
    default=[],
    help="ours only, a what-if: config field=value, e.g. model.image.activation=gelu_tanh",
  )
  p.add_argument(
    "--kernels",
    action="store_true",
    help="time the step's kernels alone (matmuls, GELU, LayerNorm) instead of the step",
  )
  p.add_argument("--profile_dir", default="", help="ours: trace extra steps into this directory")
  p.add_argument("--profile_steps", type=int, default=5)
  return p.parse_args(argv)


def cpus_of(args) -> list[int]:
  if args.cpus:
    return [int(c) for c in args.cpus.split(",")]
  return sorted(os.sched_getaffinity(0))


def pin(args) -> int:
  """Pins this process to `--cpus` (before JAX or torch start their thread pools)."""
  cpus = cpus_of(args)
  os.sched_setaffinity(0, cpus)
  return len(cpus)


def cpu_model() -> str:
  """`"AMD EPYC (family 25, model 1, 2445 MHz; 2 CPUs)"` from /proc/cpuinfo."""
  fields, count = {}, 0
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        count += key == "processor"
        fields.setdefault(key, value.strip())
  except OSError:
    return "unknown CPU"
  mhz = fields.get("cpu MHz", "?").split(".")[0]
  return (
    f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model "
    f"{fields.get('model', '?')}, {mhz} MHz; {count} CPUs)"
  )


def timed(step, steps: int, warmup: int, sync) -> dict:
  """Runs `step` `warmup` times, then `steps` timed times; `sync()` waits for the last one."""
  for _ in range(warmup):
    step()
  sync()
  times = []
  start = time.perf_counter()
  for _ in range(steps):
    t = time.perf_counter()
    step()
    sync()
    times.append(time.perf_counter() - t)
  total = time.perf_counter() - start
  return {"seconds": total, "step_ms_median": 1e3 * statistics.median(times)}


# ----------------------------------------------------------------------------------------------
# Our side.


def our_config(args):
  """`configs/clip.py:demo` with the peer architecture, batch and optimizer."""
  sys.path.insert(0, ROOT)
  from configs import clip, common

  c = clip.get_config("demo")
  c.name, c.variant = "clip_peer", "peer"
  c.batch_size = args.batch_size
  c.evals = {}
  c.data = common.shapes_data(image_size=args.image_size, max_len=args.context)
  clip_layout = dict(layer_norm_eps=1e-5, activation="gelu")
  c.model.image = common.image_tower(
    "Ti",
    image_size=args.image_size,
    patch_size=args.patch_size,
    width=args.width,
    depth=args.depth,
    num_heads=args.heads,
    mlp_dim=4 * args.width,
    cls_pos_embed=True,
    ln_pre=True,
    patch_bias=False,
    **clip_layout,
  )
  c.model.text = common.text_tower(
    "Ti",
    vocab_size=args.vocab_size,
    max_len=args.context,
    width=args.text_width,
    depth=args.text_depth,
    num_heads=args.text_heads,
    mlp_dim=4 * args.text_width,
    causal=True,
    pool="eos",
    **clip_layout,
  )
  c.model.embed_dim = args.embed_dim
  c.optim.update(
    lr=args.lr, warmup_steps=0, weight_decay=args.weight_decay, grad_clip=0.0, min_lr_ratio=1.0
  )
  c.total_steps = 1_000_000
  for item in args.ours_set:
    path, _, text = item.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = path.split(".")
    node = c
    for key in parents:
      node = node[key]
    node[leaf] = value
  return c


def full_model_flops(setup) -> float | None:
  """XLA's FLOP count of the same step computing every token of every block, the work open_clip
  does: the plain two-tower method skips the last blocks' unpooled rows (`Method.student_tokens`,
  docs/architecture.md), so its own count is lower. The common yardstick of the GFLOP/s column."""
  from pooled_only_flops import step_flops_asking_tokens  # bench/, beside this script

  return step_flops_asking_tokens(setup, True)


def run_ours(args) -> dict:
  import jax

  from vlalign import perf, sharding, testing, trainer

  perf.set_up_host(retain_memory=args.retain_host_memory)  # as the binaries do (vlalign.cli)

  config = our_config(args)
  setup = trainer.build(config, data=False)
  state = trainer.fresh_state(setup, jax.random.PRNGKey(0))
  start = time.perf_counter()
  lowered = trainer.lower_step(setup)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  flops = trainer.step_flops(setup, lowered, compiled)
  full_flops = full_model_flops(setup)
  batch = jax.device_put(testing.synthetic_batch(setup.spec), sharding.batch_sharding(setup.mesh))
  box = {"state": state, "metrics": None}

  def step():
    box["state"], box["metrics"] = compiled(box["state"], batch)

  with jax.set_mesh(setup.mesh):
    result = timed(step, args.steps, args.warmup, lambda: jax.block_until_ready(box["metrics"]))
    loss = float(box["metrics"]["loss"])
    if args.profile_dir:
      jax.profiler.start_trace(args.profile_dir)
      start = time.perf_counter()
      for i in range(args.profile_steps):
        with jax.profiler.StepTraceAnnotation("train", step_num=i):
          step()
          jax.block_until_ready(box["metrics"])
      profile_ms = 1e3 * (time.perf_counter() - start) / args.profile_steps
      jax.profiler.stop_trace()
  params = sum(x.size for x in jax.tree.leaves(box["state"].params))
  versions = {m: __import__(m).__version__ for m in ("jax", "jaxlib", "flax", "optax")}
  return {
    **result,
    "compile_s": compile_s,
    "gflop_per_step": None if flops is None else flops / 1e9,
    "gflop_full_model": None if full_flops is None else full_flops / 1e9,
    "params": int(params),
    "loss": loss,
    "devices": jax.device_count(),
    "versions": versions,
    "hlo": compiled.as_text() if args.profile_dir else None,
    "profile_ms": profile_ms if args.profile_dir else None,
  }


# ----------------------------------------------------------------------------------------------
# open_clip's side (runs in --torch_python; imports nothing of this project).


def _import_open_clip():
  """`(torch, open_clip, note)`; skips torchvision's C++ op registrations when they cannot load."""
  import types

  import torch

  try:
    import open_clip

    return torch, open_clip, ""
  except RuntimeError as e:
    if "torchvision" not in str(e):
      raise
    for name in [n for n in sys.modules if n.startswith(("torchvision", "open_clip"))]:
      del sys.modules[name]
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
      sys.modules[name] = types.ModuleType(name)
    import open_clip

    return torch, open_clip, "torchvision's C++ ops unavailable (not used by CLIP)"


def run_torch(args, threads: int) -> dict:
  try:
    torch, open_clip, note = _import_open_clip()
  except ImportError as e:
    print(f"torch side unavailable: {e}", file=sys.stderr)
    sys.exit(NO_TORCH)
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = open_clip.CLIP(
    embed_dim=args.embed_dim,
    vision_cfg=dict(
      image_size=args.image_size,
      patch_size=args.patch_size,
      width=args.width,
      layers=args.depth,
      head_width=args.width // args.heads,
      mlp_ratio=4.0,
    ),
    text_cfg=dict(
      context_length=args.context,
      vocab_size=args.vocab_size,
      width=args.text_width,
      heads=args.text_heads,
      layers=args.text_depth,
    ),
    output_dict=True,
  )
  model.train()
  loss_fn = open_clip.loss.ClipLoss()

  # open_clip_train/main.py: no weight decay on gains, biases and the logit scale.
  def exclude(n, p):
    return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

  named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(
    [
      {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
      {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": args.weight_decay},
    ],
    lr=args.lr,
    betas=(0.9, 0.98),
    eps=1e-6,
  )
  gen = torch.Generator().manual_seed(0)
  shape = (args.batch_size, 3, args.image_size, args.image_size)
  images = torch.randn(shape, generator=gen)
  texts = torch.randint(5, 60, (args.batch_size, args.context), generator=gen)
  texts[:, -1] = args.vocab_size - 1  # The EOT token (the largest id) pools at the last position.
  box = {}

  def step():  # open_clip_train/train.py: train_one_epoch, one batch, precision fp32.
    out = model(images, texts)
    losses = loss_fn(**out, output_dict=True)
    total = sum(losses.values())
    total.backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
      model.logit_scale.clamp_(0, math.log(100))
    box["loss"] = total.detach()

  result = timed(step, args.steps, args.warmup, lambda: None)
  if args.profile_dir:
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
      for _ in range(args.profile_steps):
        step()
    print(f"open_clip step, {args.profile_steps} profiled steps (torch.profiler, self CPU time):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
  versions = {"torch": torch.__version__, "open_clip": open_clip.__version__}
  return {
    **result,
    "params": int(sum(p.numel() for p in model.parameters())),
    "loss": float(box["loss"]),
    "threads": torch.get_num_threads(),
    "versions": versions,
    "note": note,
  }


# ----------------------------------------------------------------------------------------------
# The step's kernels alone (--kernels): is a gap in the kernels or in how the step uses them?


def kernel_shapes(args) -> list[tuple[int, int, int]]:
  """`(m, k, n)` of the image tower's dense matmuls: tokens x width into the MLP and back, q/k/v,
  and the two MLP weight gradients."""
  tokens = args.batch_size * ((args.image_size // args.patch_size) ** 2 + 1)
  w, h = args.width, 4 * args.width
  return [(tokens, w, h), (tokens, h, w), (tokens, w, w), (w, tokens, h), (h, tokens, w)]


def _ms(fn, reps: int = 20) -> float:
  fn()
  fn()
  start = time.perf_counter()
  for _ in range(reps):
    fn()
  return 1e3 * (time.perf_counter() - start) / reps


def kernels_ours(args) -> dict[str, float]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import linen as nn

  out, key = {}, jax.random.PRNGKey(0)
  for m, k, n in kernel_shapes(args):
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    f = jax.jit(jnp.matmul)
    ms = _ms(lambda f=f, a=a, b=b: f(a, b).block_until_ready())
    out[f"matmul {m}x{k}x{n} (GFLOP/s)"] = 2e-6 * m * k * n / ms
  tokens, w = kernel_shapes(args)[0][:2]
  x = jax.random.normal(key, (tokens, 4 * w))
  gelu = jax.jit(lambda x: jax.nn.gelu(x, approximate=False))
  out["exact GELU [tokens, 4w] (ms)"] = _ms(lambda: gelu(x).block_until_ready())
  ln = nn.LayerNorm(epsilon=1e-5)
  xl = x[:, :w]
  params = ln.init(key, xl)
  norm = jax.jit(ln.apply)
  out["LayerNorm [tokens, w] (ms)"] = _ms(lambda: norm(params, xl).block_until_ready())
  xm, w1 = x[:, :w], jax.random.normal(key, (w, 4 * w)) * 0.05
  w2, b1 = jax.random.normal(key, (4 * w, w)) * 0.05, jnp.zeros(4 * w)
  half = np.float32(np.sqrt(0.5))
  forms = {
    "exact, jax.nn.gelu (erfc)": lambda h: jax.nn.gelu(h, approximate=False),
    "exact, 0.5x(1+erf(x/sqrt2))": lambda h: 0.5 * h * (1 + jax.lax.erf(h * half)),
    "tanh approximation": lambda h: jax.nn.gelu(h, approximate=True),
  }
  for name, act in forms.items():

    def loss(x, w1, b1, w2, act=act):
      return jnp.sum(act(x @ w1 + b1) @ w2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    out[f"MLP block fwd+bwd, GELU {name} (ms)"] = _ms(
      lambda grad=grad: jax.block_until_ready(grad(xm, w1, b1, w2))
    )
  return out


def kernels_torch(args) -> dict[str, float]:
  torch = _import_open_clip()[0]
  out = {}
  with torch.no_grad():
    for m, k, n in kernel_shapes(args):
      a, b = torch.ones(m, k), torch.ones(k, n)
      out[f"matmul {m}x{k}x{n} (GFLOP/s)"] = 2e-6 * m * k * n / _ms(lambda a=a, b=b: a @ b)
    tokens, w = kernel_shapes(args)[0][:2]
    x = torch.randn(tokens, 4 * w)
    out["exact GELU [tokens, 4w] (ms)"] = _ms(lambda: torch.nn.functional.gelu(x))
    ln, xl = torch.nn.LayerNorm(w, eps=1e-5), x[:, :w].contiguous()
    out["LayerNorm [tokens, w] (ms)"] = _ms(lambda: ln(xl))
  mlp = torch.nn.Sequential(torch.nn.Linear(w, 4 * w), torch.nn.GELU(), torch.nn.Linear(4 * w, w))
  xm = x[:, :w].contiguous().requires_grad_()
  out["MLP block fwd+bwd, GELU exact, nn.GELU (ms)"] = _ms(lambda: mlp(xm).sum().backward())
  return out


# ----------------------------------------------------------------------------------------------
# Where our step's time goes (from the jax.profiler trace and the compiled HLO).


def hlo_instructions(hlo: str) -> dict[str, tuple[str, str, str]]:
  """`{instruction: (opcode, fusion kind, jax op_name)}` of a compiled module's text."""
  out = {}
  for line in hlo.splitlines():
    m = re.match(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(", line)
    if m:
      op_name = re.search(r'op_name="([^"]*)"', line)
      kind = re.search(r'"kind":"(\w+)"', line)
      out[m.group(1)] = (
        m.group(2),
        kind.group(1) if kind else "",
        op_name.group(1) if op_name else "",
      )
  return out


MATMUL = "dense matmuls (q/k/v/out, MLP, patch, projections)"
ATTENTION = "attention core (QK^T, mask, softmax, PV)"
GELU = "MLP GELU (exact erf) and bias"
LAYERNORM = "layernorm"
EMBEDDING = "token embedding (gather; zero-filled dense gradient, scatter-add)"
OUTSIDE = "outside the model: AdamW, grad/param norms, metrics"
OTHER = "residual and bias adds, loss, copies, other"


def categorize(opcode: str, kind: str, op_name: str) -> tuple[str, str]:
  """`(category, "fwd" | "bwd" | "")` of one XLA operation, from its jax `op_name`."""
  direction = "bwd" if "transpose(jvp(" in op_name else "fwd" if "jvp(" in op_name else ""
  if not direction:
    return OUTSIDE, ""
  matmul = opcode in ("dot", "convolution") or (
    kind == "__ynn_fusion" and re.search(r"(dot_general|conv_general)$", op_name)
  )
  if "token_embed" in op_name:
    return EMBEDDING, direction
  if "/attn/" in op_name and not re.search(r"/attn/(query|key|value|out)/", op_name):
    return ATTENTION, direction
  if matmul:
    return MATMUL, direction
  if re.search(r"/ln_\w+/|/ln_final/|LayerNorm", op_name):
    return LAYERNORM, direction
  if "/mlp/" in op_name:
    return GELU, direction
  return OTHER, direction


def trace_breakdown(directory: str, hlo: str, steps: int) -> dict[tuple[str, str], list]:
  """`{(category, direction): [ms per step, operations per step]}` of the XLA operations in the
  newest trace under `directory` (summed over threads: operations run concurrently)."""
  paths = []
  for root, _, files in os.walk(directory):
    paths += [os.path.join(root, f) for f in files if f.endswith(".trace.json.gz")]
  if not paths:
    return {}
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    events = json.load(f)["traceEvents"]
  instructions = hlo_instructions(hlo)
  totals: dict[tuple[str, str], list] = {}
  for e in events:
    if e.get("ph") != "X" or e.get("name") not in instructions:
      continue
    total = totals.setdefault(categorize(*instructions[e["name"]]), [0.0, 0.0])
    total[0] += e.get("dur", 0) / 1e3 / steps
    total[1] += 1 / steps
  return totals


def print_breakdown(totals: dict[tuple[str, str], list], wall_ms: float) -> None:
  categories = sorted({c for c, _ in totals}, key=lambda c: -sum(
    v[0] for (k, _), v in totals.items() if k == c))  # fmt: skip
  whole = sum(v[0] for v in totals.values()) or 1.0
  print(f"XLA operation time per step, summed over threads: {whole:.0f} ms (wall {wall_ms:.0f} ms)")
  print("| category | forward (ms) | backward (ms) | other (ms) | share | ops |")
  print("|---|---|---|---|---|---|")
  for c in categories:
    cells = [totals.get((c, d), [0.0, 0])[0] for d in ("fwd", "bwd", "")]
    ops = sum(totals.get((c, d), [0.0, 0])[1] for d in ("fwd", "bwd", ""))
    print(f"| {c} | {cells[0]:.0f} | {cells[1]:.0f} | {cells[2]:.0f} | "
          f"{100 * sum(cells) / whole:.0f}% | {ops:.0f} |")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The driver.


def child_main(args) -> None:
  threads = pin(args)
  if args.kernels:
    if args.side == "torch":
      _import_open_clip()[0].set_num_threads(threads)
    result = kernels_ours(args) if args.side == "ours" else kernels_torch(args)
    print(RESULT + json.dumps(result), flush=True)
    return
  result = run_ours(args) if args.side == "ours" else run_torch(args, threads)
  result["cpus"] = sorted(os.sched_getaffinity(0))
  result["load"] = os.getloadavg()[0]  # The machine's 1-minute load average at the end.
  result["samples_per_s"] = args.batch_size * args.steps / result["seconds"]
  if args.side == "ours" and args.profile_dir:
    totals = trace_breakdown(args.profile_dir, result["hlo"], args.profile_steps)
    print_breakdown(totals, result["profile_ms"])
  result.pop("hlo", None)
  print(RESULT + json.dumps(result), flush=True)


def child_env(side: str, threads: int) -> dict:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = flags.strip()
  env["JAX_PLATFORMS"] = "cpu"
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    env[var] = str(threads)
  if side == "ours":
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run_side(side: str, args, argv: list[str]) -> dict | None:
  python = sys.executable if side == "ours" else args.torch_python
  if side == "torch" and not os.path.exists(python):
    return None
  cmd = [python, os.path.abspath(__file__), *argv, f"--side={side}"]
  proc = subprocess.run(
    cmd, env=child_env(side, len(cpus_of(args))), capture_output=True, text=True, check=False
  )
  if side == "torch" and proc.returncode == NO_TORCH:
    print(proc.stderr.strip().splitlines()[-1], file=sys.stderr)
    return None
  if proc.returncode != 0:
    raise RuntimeError(f"{side} side failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith(RESULT))
  return json.loads(line[len(RESULT) :])


def print_kernels(args, argv: list[str]) -> None:
  """`--kernels`: the sides' kernel timings, alternating, as one table of medians."""
  runs = {"ours": [], "torch": []}
  for i in range(args.pairs):
    for side in ("ours", "torch") if i % 2 == 0 else ("torch", "ours"):
      r = run_side(side, args, argv)
      if r is not None:
        runs[side].append(r)
  names = list(dict.fromkeys(k for side in runs.values() for r in side for k in r))
  print("| kernel (1 call) | vlalign / XLA | open_clip / torch |\n|---|---|---|")
  for name in names:
    cells = []
    for side in ("ours", "torch"):
      values = [r[name] for r in runs[side] if name in r]
      cells.append(f"{statistics.median(values):.1f}" if values else "")
    print(f"| {name} | {cells[0]} | {cells[1]} |")


def main(argv=None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.side != "both":
    child_main(args)
    return
  argv = [a for a in argv if not a.startswith("--side")]
  print(f"CPU: {cpu_model()}; both sides pinned to CPUs {cpus_of(args)}")
  print(f"command: {' '.join([sys.executable, *sys.argv])}")
  if args.kernels:
    print_kernels(args, argv)
    return
  runs = {"ours": [], "torch": []}
  torch_missing = False
  for i in range(args.pairs):
    order = ("ours", "torch") if i % 2 == 0 else ("torch", "ours")
    for side in order:
      if side == "torch" and torch_missing:
        continue
      r = run_side(side, args, argv)
      if r is None:
        torch_missing = True
        print(
          f"open_clip side skipped: no torch + open_clip_torch at {args.torch_python} (install "
          "them in a separate virtualenv, see the module docstring)"
        )
        continue
      runs[side].append(r)
      print(
        f"pair {i + 1} {side:5s}: {r['samples_per_s']:7.1f} samples/s "
        f"(median step {r['step_ms_median']:.1f} ms, loss {r['loss']:.3f}, params {r['params']}, "
        f"load {r['load']:.1f})",
        flush=True,
      )
  ours = runs["ours"]
  print(f"ours: {ours[0]['versions']}, {ours[0]['devices']} device(s), compile "
        f"{statistics.median(r['compile_s'] for r in ours):.1f} s, "
        f"{ours[0]['gflop_per_step']:.4g} GFLOP per step (XLA), "
        f"{ours[0]['gflop_full_model']:.4g} for the full model (open_clip's work)")  # fmt: skip
  if runs["torch"]:
    t = runs["torch"][0]
    print(f"open_clip: {t['versions']}, torch threads {t['threads']} {t['note']}")
  med = {k: statistics.median(r["samples_per_s"] for r in v) for k, v in runs.items() if v}
  gflop = ours[0]["gflop_full_model"]
  print("| side | runs | samples/s (median) | min - max | step (ms, median) | full-model GFLOP/s |")
  print("|---|---|---|---|---|---|")
  for side, label in (("ours", "vlalign (JAX)"), ("torch", "open_clip (PyTorch)")):
    if not runs[side]:
      continue
    s = [r["samples_per_s"] for r in runs[side]]
    ms = 1e3 * args.batch_size / med[side]
    print(f"| {label} | {len(s)} | {med[side]:.1f} | {min(s):.1f} - {max(s):.1f} | {ms:.1f} | "
          f"{gflop * med[side] / args.batch_size:.1f} |")  # fmt: skip
  if "torch" in med:
    pairs = [o["samples_per_s"] / t["samples_per_s"] for o, t in zip(ours, runs["torch"])]
    print(
      f"ratio ours / open_clip: {med['ours'] / med['torch']:.2f} (of the medians); per pair "
      f"{', '.join(f'{p:.2f}' for p in pairs)} (median {statistics.median(pairs):.2f})"
    )


if __name__ == "__main__":
  main()
