"""Throughput accounting (vlalign/perf.py), the persistent compilation cache flag, the platform
check, and the accelerator requirement files."""

import os
import re
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import clip
from vlalign import metrics, perf, testing, trainer
from vlalign.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
  return testing.subprocess_env(PYTHONPATH=ROOT, **extra)


def test_a_jitted_matmul_costs_2mnk_flops():
  m, n, k = 64, 48, 32
  args = (jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32))
  compiled = jax.jit(jnp.matmul).lower(*args).compile()
  assert perf.step_flops(compiled) == 2 * m * n * k


def test_a_sharded_step_reports_the_flops_of_one_device():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  m, n, k = 256, 64, 128
  matmul = jax.jit(jnp.matmul, in_shardings=(rows, replicated), out_shardings=rows)
  args = (jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32))
  compiled = matmul.lower(*args).compile()
  assert perf.step_flops(compiled) == 2 * m * n * k / jax.device_count()


def _compiled(analysis):
  def cost_analysis():
    if isinstance(analysis, Exception):
      raise analysis
    return analysis

  return types.SimpleNamespace(cost_analysis=cost_analysis)


def test_step_flops_reads_a_dict_or_a_list_of_dicts_and_none_where_the_backend_has_none():
  assert perf.step_flops(_compiled({"flops": 10.0, "bytes accessed": 4.0})) == 10.0
  assert perf.step_flops(_compiled([{"flops": 10.0}, {"flops": 5.0}])) == 15.0
  for missing in ({}, [], [{}], None, {"flops": 0.0}, {"flops": -1.0}, {"flops": float("nan")}):
    assert perf.step_flops(_compiled(missing)) is None, missing
  assert perf.step_flops(_compiled(NotImplementedError("no cost analysis"))) is None


def test_the_peak_table_matches_device_kinds_exactly_and_an_override_wins():
  assert perf.table_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert perf.table_peak_tflops("NVIDIA H200") == 989.0
  assert perf.table_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
  assert perf.table_peak_tflops("TPU v4") == 275.0
  assert perf.table_peak_tflops("TPU v5 lite") == 197.0  # v5e
  assert perf.table_peak_tflops("TPU v5") == 459.0  # v5p
  assert perf.table_peak_tflops("TPU v6 lite") == 918.0  # v6e
  assert perf.table_peak_tflops("TPU v4 lite") is None  # v4i: not a v4
  assert perf.table_peak_tflops("NVIDIA GeForce RTX 4090") is None

  def device(kind, platform="gpu"):
    return types.SimpleNamespace(device_kind=kind, platform=platform)

  assert perf.device_peak(device=device("TPU v5 lite", "tpu")) == perf.Peak(197.0, "table")
  assert perf.device_peak(device=device("Some GPU")) == perf.Peak(None, "unknown")
  assert perf.device_peak(123.0, device=device("Some GPU")) == perf.Peak(123.0, "override")
  assert perf.device_peak(50.0, device=device("NVIDIA H200")) == perf.Peak(50.0, "override")


def test_on_a_cpu_the_peak_is_a_measured_matmul_shared_by_the_simulated_devices(monkeypatch):
  assert 0 < perf.measured_cpu_tflops(size=256, repeats=2) < 100
  monkeypatch.setattr(perf, "measured_cpu_tflops", lambda: 0.8)
  peak = perf.device_peak()
  assert peak.source == "measured"
  assert peak.tflops == pytest.approx(0.8 / jax.local_device_count())


def test_a_measured_peak_is_measured_again_and_a_known_one_kept(monkeypatch):
  monkeypatch.setattr(perf, "probe_cpu_tflops", lambda: 0.6)
  again = perf.remeasured(perf.Peak(0.8, "measured"))
  assert again == perf.Peak(pytest.approx(0.6 / jax.local_device_count()), "measured")
  for known in (perf.Peak(197.0, "table"), perf.Peak(5.0, "override"), perf.Peak(None, "unknown")):
    assert perf.remeasured(known) == known


def test_rounds_give_the_median_step_and_the_median_of_each_rounds_own_mfu():
  # 1e11 FLOP per step: 0.2 s -> 0.5 TFLOP/s, 0.1 s -> 1.0, 0.4 s -> 0.25.
  out = perf.summarize_rounds([0.2, 0.1, 0.4], [1.0, 2.0, 0.25], flops=1e11, batch=64)
  assert out["step_ms"] == pytest.approx(200.0)
  assert out["samples_per_s"] == pytest.approx(320.0)
  assert out["tflops_per_device"] == pytest.approx(0.5)
  assert out["rounds_ms"] == pytest.approx([200.0, 100.0, 400.0])
  # Each round against its own peak: 0.5 / 1.0, 1.0 / 2.0, 0.25 / 0.25. A peak measured once (the
  # first) would give 0.5, 1.0, 0.25 instead.
  assert out["rounds_mfu"] == pytest.approx([0.5, 0.5, 1.0])
  assert (out["mfu"], out["mfu_min"], out["mfu_max"]) == pytest.approx((0.5, 0.5, 1.0))
  unknown = perf.summarize_rounds([0.2, 0.1], [None, None], flops=1e11, batch=64)
  assert "mfu" not in unknown and unknown["step_ms"] == pytest.approx(150.0)
  assert "tflops_per_device" not in perf.summarize_rounds([0.2], [1.0], flops=None, batch=64)


def test_train_bench_refuses_zero_rounds_or_steps():
  for flag in ("--rounds=0", "--steps=0"):
    cmd = [sys.executable, "bench/train_bench.py", "--config=configs/clip.py:tiny", flag]
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert flag in result.stderr and "must be >= 1" in result.stderr, result.stderr[-2000:]


def test_the_gpu_bench_script_runs_every_row_and_reports_a_failed_one(tmp_path):
  """bench/gpu_bench.sh, as a lent GPU session would run it, here on the CPU with tiny rows: a row
  that fails (a missing config) leaves the next row's table, and the exit status says so. The
  row is bench/train_bench.py's: the median round's MFU with its range, and every round."""
  rows = "configs/missing.py:tiny|;configs/clip.py:tiny|--config.batch_size=32"
  rows += ";bench/attention_config.py:clip.tiny.xla|"
  env = _env(
    OUT=str(tmp_path), PYTHON=sys.executable, BENCH_ROWS=rows, BENCH_FLAGS="--steps=1 --rounds=3"
  )
  cmd = ["bash", "bench/gpu_bench.sh", "run"]
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode != 0
  log = (tmp_path / "gpu_bench.log").read_text()
  assert "== smoke: configs/clip.py:tiny" in log
  assert "== FAILED (1): configs/missing.py:tiny" in log
  row = re.search(r"^\| clip_tiny:tiny \| 8 \| 32 \|.*$", log, re.M)
  assert row and log.index("FAILED") < row.start(), log[-3000:]
  assert "measured again before each round" in log
  assert re.search(r"\| \d+\.\d% \(\d+\.\d-\d+\.\d\) \|", row.group(0)), row.group(0)
  rounds = re.findall(r"^clip_tiny:tiny: rounds: (.*)$", log, re.M)[-1].split("; ")
  assert len(rounds) == 3
  assert all(re.fullmatch(r"\d+\.\d ms / \d+ GFLOP/s = \d+\.\d%", r) for r in rounds), rounds
  # The image tower's attention through jax.nn.dot_product_attention ("cudnn" on the GPU).
  assert re.search(r"^\| clip_tiny_xla_attention:tiny \| 8 \| 16 \|", log, re.M), log[-3000:]


def test_mfu_arithmetic():
  out = perf.utilisation(flops_per_step=2e12, steps_per_s=0.5, peak_tflops=4.0)
  assert out == {"tflops_per_device": pytest.approx(1.0), "mfu": pytest.approx(0.25)}
  assert perf.utilisation(2e12, 0.5, None) == {"tflops_per_device": pytest.approx(1.0)}
  assert perf.utilisation(None, 0.5, 4.0) == {}


def test_progress_reports_tflops_and_mfu_beside_samples_per_s():
  progress = metrics.Progress(100, 8, 0, flops_per_step=1e12, peak_tflops=10.0)
  progress.last_time -= 10.0  # 50 steps in 10 s: 5 steps/s, 5 TFLOP/s
  out = progress.update(50)
  assert out["tflops_per_device"] == pytest.approx(5.0, rel=0.05)
  assert out["mfu"] == pytest.approx(0.5, rel=0.05)
  line = metrics.progress_line(50, 100, {f"perf/{k}": v for k, v in out.items()})
  assert re.search(r"40 samples/s, 5(\.\d+)? TFLOP/s/device, MFU 5\d\.\d%, ETA", line), line
  plain = metrics.Progress(100, 8, 0).update(1)
  assert "mfu" not in plain and "tflops_per_device" not in plain


def test_training_writes_tflops_and_mfu_to_the_metrics_file(tmp_path):
  config = clip.get_config("tiny")
  config.evals = {}
  config.total_steps = 2
  config.log_every = 1
  trainer.train_and_evaluate(config, str(tmp_path), peak_tflops=0.5)
  rows = [r for r in metrics.read_jsonl(tmp_path / "metrics.jsonl") if "perf/steps_per_s" in r]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert r["perf/tflops_per_device"] > 0
    assert r["perf/mfu"] == pytest.approx(r["perf/tflops_per_device"] / 0.5)


def test_check_platform_names_the_install_line():
  perf.check_platform(None)
  perf.check_platform("")
  perf.check_platform("cpu")  # the tests run on the CPU
  with pytest.raises(UserError, match=r"--platform=gpu but JAX runs on cpu .*requirements-cuda"):
    perf.check_platform("gpu")
  with pytest.raises(UserError, match=r"requirements-tpu\.txt"):
    perf.check_platform("tpu", found="gpu")
  with pytest.raises(UserError, match="choose one of"):
    perf.check_platform("rocm")


def test_the_train_binary_refuses_a_platform_jax_did_not_find(tmp_path):
  cmd = [
    sys.executable, "-m", "vlalign.train", "--config=configs/clip.py:tiny",
    f"--workdir={tmp_path / 'run'}", "--platform=gpu",
  ]  # fmt: skip
  result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --platform=gpu but JAX runs on cpu"), last
  assert "pip install -r requirements-cuda.txt" in last
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()  # stopped before anything was written


# A binary run by `cli.run`: jit-compiles a small function and prints the persistent cache's hits.
_CACHE_SCRIPT = textwrap.dedent("""
  import jax
  import jax.numpy as jnp

  from vlalign import cli, perf

  def main(argv):
    with perf.CacheHits() as hits:
      jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)(jnp.ones((64, 64))).block_until_ready()
    print(f"cache hits: {hits.count}")

  cli.run(main)
""")


def test_compilation_cache_dir_is_written_by_one_process_and_read_by_the_next(tmp_path):
  cache = tmp_path / "jax_cache"
  cmd = [sys.executable, "-c", _CACHE_SCRIPT, f"--compilation_cache_dir={cache}"]
  # Cache even this millisecond compilation (the default threshold is 1 s).
  env = _env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "cache hits: 0" in first.stdout
  entries = sorted(os.listdir(cache))
  assert entries, "the first process wrote nothing to the cache"

  second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  assert re.search(r"cache hits: [1-9]", second.stdout), second.stdout

  # Without the flag nothing is cached or read.
  off = subprocess.run(cmd[:-1], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert "cache hits: 0" in off.stdout
  assert sorted(os.listdir(cache)) == entries


_REUSE_SCRIPT = textwrap.dedent("""
  import resource
  import numpy as np
  from vlalign import cli

  def main(argv):
    np.ones(1 << 23)  # 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
      np.ones(1 << 23)  # allocated, written, freed
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

  cli.run(main)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_binaries_retain_host_memory_so_a_freed_block_is_reused_without_page_faults():
  """`--noretain_host_memory`: each 64 MiB block is a fresh mmap whose pages fault in when written
  (fewer faults with transparent huge pages). By default (`perf.retain_host_memory`) the freed
  block is written again in place."""
  faults = {}
  for flags in ([], ["--noretain_host_memory"]):
    result = subprocess.run(
      [sys.executable, "-c", _REUSE_SCRIPT, *flags], cwd=ROOT, env=_env(), capture_output=True,
      text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    faults[bool(flags)] = int(result.stdout.split()[-1])
  assert faults[True] >= 5 * 32  # off: at least one fault per 2 MiB huge page written
  assert faults[False] < faults[True] / 10


@pytest.mark.parametrize("unrolled", [True, False])
def test_threefry2x32_gives_the_published_known_answers(unrolled):
  """Random123's known-answer tests for Threefry-2x32 with 20 rounds: (key, counter) -> output."""
  cases = [
    ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
  ]
  for key, counter, expected in cases:
    words = [jnp.uint32(w) for w in (*key, *counter)]
    out = jax.jit(lambda *w: perf.threefry2x32(*w, unrolled=unrolled))(*words)
    assert tuple(int(w) for w in out) == expected


def test_random_draws_export_with_symbolic_shapes_and_keep_their_bits():
  """Under shape polymorphism the size of a draw is symbolic: the lowering keeps JAX's loop
  (tests/conftest.py installs `perf.unroll_threefry_on_cpu` for the suite)."""
  from jax import export

  draw = jax.jit(lambda key, x: x * jax.random.bernoulli(key, 0.9, x.shape))
  x_spec = jax.ShapeDtypeStruct(export.symbolic_shape("b, 512"), jnp.float32)
  exported = export.export(draw)(jax.random.PRNGKey(0), x_spec)
  x = np.ones((64, 512), np.float32)
  np.testing.assert_array_equal(
    exported.call(jax.random.PRNGKey(0), x), draw(jax.random.PRNGKey(0), x)
  )


_DRAWS_SCRIPT = textwrap.dedent("""
  import hashlib
  import sys
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from vlalign import cli

  def main(argv):
    key = jax.random.key(7)
    data = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    draws = {
      "large": jax.jit(lambda k: jax.random.bits(k, (8, 4099))),  # odd: a padded counter
      "sharded": jax.jit(lambda k: jax.random.uniform(k, (64, 512)), out_shardings=data),
      "dropout": jax.jit(lambda k: jax.random.bernoulli(k, 0.9, (64, 24, 128))),
      "small": jax.jit(lambda k: (jax.random.split(k, 3), jax.random.fold_in(k, 5),
                                  jax.random.normal(k, (33,)))),
    }
    for name, draw in draws.items():
      out = jax.tree.leaves(draw(key))
      out = [jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
             for x in out]
      digest = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in out)).hexdigest()
      loops = "while" in draw.lower(key).compile().as_text()
      print(name, digest, "loop" if loops else "no-loop")

  if sys.argv[1:] == ["binary"]:
    cli.run(main)
  else:
    main([])
""")


def test_binaries_draw_jax_bits_with_large_draws_in_one_fused_loop():
  """`vlalign.cli` binaries lower large Threefry calls written out (`perf.unroll_threefry_on_cpu`):
  the same bits as JAX's own lowering (a plain process), sharded or not, without its loop."""
  lines = {}
  for mode in ("binary", "plain"):
    result = subprocess.run(
      [sys.executable, "-c", _DRAWS_SCRIPT, mode], cwd=ROOT, env=_env(), capture_output=True,
      text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (line.split() for line in result.stdout.splitlines())
    lines[mode] = {name: (digest, loop) for name, digest, loop in rows}
  plain, binary = lines["plain"], lines["binary"]
  assert set(plain) == set(binary) == {"large", "sharded", "dropout", "small"}
  for name in plain:
    assert binary[name][0] == plain[name][0], name  # the same bits
    assert plain[name][1] == "loop", name  # JAX's CPU lowering loops over the round groups
  assert {name: binary[name][1] for name in binary} == {
    "large": "no-loop",
    "sharded": "no-loop",
    "dropout": "no-loop",
    "small": "loop",  # below min_size: the loop compiles faster
  }


_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[A-Za-z0-9_,.-]+\])?==([0-9][^\s;]*)$")


def _pins(name: str) -> tuple[dict[str, str], list[str]]:
  """`({package: version}, [included files])` of a requirements file; every package line must be
  an exact `name[extras]==version` pin."""
  pins, includes = {}, []
  with open(os.path.join(ROOT, name)) as f:
    for raw in f:
      line = raw.split("#", 1)[0].strip()
      if not line:
        continue
      if line.startswith("-r "):
        includes.append(line[3:].strip())
        continue
      match = _REQUIREMENT.match(line)
      assert match, f"{name}: {line!r} is not an exact pin (name==version)"
      package = match.group(1).lower().replace("_", "-")
      assert package not in pins, f"{name}: {package} pinned twice"
      pins[package] = match.group(3)
  return pins, includes


def test_accelerator_requirements_pin_every_package_and_agree_with_requirements_txt():
  base, _ = _pins("requirements.txt")
  jax_version = base["jax"]
  assert base["jaxlib"] == jax_version

  cuda, includes = _pins("requirements-cuda.txt")
  assert includes == ["requirements.txt"]
  assert cuda["jax-cuda12-plugin"] == jax_version
  assert cuda["jax-cuda12-pjrt"] == jax_version
  assert not set(cuda) & set(base), "requirements-cuda.txt repins a package of requirements.txt"

  tpu, includes = _pins("requirements-tpu.txt")
  assert includes == ["requirements.txt"]
  assert "libtpu" in tpu
  assert not set(tpu) & set(base), "requirements-tpu.txt repins a package of requirements.txt"

  # The libtpu that jax declares for its `tpu` extra (jax 0.10.2: libtpu==0.0.42.*).
  libtpu_for_jax = {"0.10.2": "0.0.42."}
  if jax_version in libtpu_for_jax:
    assert tpu["libtpu"].startswith(libtpu_for_jax[jax_version])
