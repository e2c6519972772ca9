"""Two localhost processes stand in for a two-host pod: launch/local_multiprocess.sh end to end,
and evaluation split over the processes (this file is also the worker those processes run)."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

from vlalign import checkpoint, metrics, testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_processes_train_and_checkpoint(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHON=sys.executable, DEVICES_PER_PROCESS="2")
  cmd = [
    "bash", "launch/local_multiprocess.sh", "2", "--config=configs/clip.py:tiny",
    f"--workdir={tmp_path}", "--config.total_steps=3", "--config.log_every=1",
    "--config.checkpoint_every=1", "--config.keep_checkpoints=1", "--config.evals={}",
  ]  # fmt: skip
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))  # written by process 0 only
  assert [r["step"] for r in rows] == [1, 2, 3]
  # Retention ran on both processes: only the newest checkpoint is left.
  assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [3]
  assert "2 local / 4 global devices, process 1 of 2" in result.stderr  # perf.describe_devices


# ----------------------------------------------------------------------------- sharded evaluation

EVAL_BATCH = 8  # 16 images: 2 batches over 4 devices, so each of 2 processes holds 8 rows
ZEROSHOT_CLASSES = {"blue": (40, 60, 200), "green": (40, 190, 70), "red": (210, 50, 40)}


def _write_eval_data(root: pathlib.Path) -> dict:
  """A 16-image ALBEF split (image 13 truncated) and a 16-image class folder tree (its last
  image, `red/zz_bad.jpg`, truncated); returns the worker's `data` argument."""
  from PIL import Image

  from vlalign.data import shapes_to_files

  spec = shapes_to_files.write(str(root / "albef"), "albef_json", {"val": 16}, image_size=32)["val"]
  entries = json.loads(pathlib.Path(spec["ann"]).read_text())
  bad = pathlib.Path(spec["image_root"], entries[13]["image"])
  bad.write_bytes(bad.read_bytes()[:100])
  rng = np.random.default_rng(0)
  for colour, rgb in ZEROSHOT_CLASSES.items():
    (root / "folder" / colour).mkdir(parents=True)
    for i in range(5):
      pixels = np.clip(rng.normal(rgb, 40, size=(12 + 4 * i, 20, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(root / "folder" / colour / f"{i}.jpg", quality=95)
  good = (root / "folder" / "red" / "0.jpg").read_bytes()
  (root / "folder" / "red" / "zz_bad.jpg").write_bytes(good[:120])
  return {"val": spec, "folder": str(root / "folder")}


def _eval_worker(args: dict) -> None:
  """One process of a sharded evaluation: runs a retrieval, a retrieval_itm and a streamed
  zero-shot evaluator through `sharding.host_fn` on a mesh of every process's devices and writes
  their metrics, decode counts and image embeddings to `args["out"]`."""
  import jax

  if args["num_processes"] > 1:
    jax.distributed.initialize(
      f"127.0.0.1:{args['port']}", args["num_processes"], args["process_id"]
    )
  import jax.numpy as jnp

  from vlalign import evaluation, sharding
  from vlalign.data.tokenizer import build_tokenizer
  from vlalign.evaluation import retrieval

  def unit(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)

  def image_tokens(params, images):  # [B, 16, 16, 3] -> [B, 16, 3]: the means of 4x4 patches
    return images.reshape(len(images), 4, 4, 4, 4, 3).mean(axis=(2, 4)).reshape(-1, 16, 3)

  def encode_image(params, images):
    return unit(image_tokens(params, images).reshape(len(images), -1) @ params["image"])

  def text_tokens(params, ids, mask):
    return params["words"][ids] * mask[..., None]

  def encode_text(params, ids, mask):
    return unit(text_tokens(params, ids, mask).sum(axis=1))

  def itm_score(params, image_tok, text_tok, mask):
    return jnp.sum((image_tok.mean(axis=1) @ params["itm"]) * text_tok.sum(axis=1), axis=1)

  fns = {
    "encode_image": encode_image,
    "encode_text": encode_text,
    "encode_image_tokens": lambda p, x: (encode_image(p, x), image_tokens(p, x)),
    "encode_text_tokens": lambda p, i, m: (encode_text(p, i, m), text_tokens(p, i, m)),
    "itm_score": itm_score,
  }
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  tokenizer = build_tokenizer(dict(tokenizer="shapes_words"))
  rng = np.random.default_rng(1)
  params = {
    "image": rng.normal(size=(48, 16)).astype(np.float32),
    "words": rng.normal(size=(tokenizer.vocab_size, 16)).astype(np.float32),
    "itm": rng.normal(size=(3, 16)).astype(np.float32),
  }
  params = jax.device_put(params, sharding.replicated(mesh))
  folder = dict(format="image_folder", root=args["data"]["folder"], num_threads=2)
  evaluators = evaluation.build_evaluators(
    {
      "ret": dict(type="retrieval", split="val"),
      "itm": dict(type="retrieval_itm", split="val", k=4),
      "zs": dict(type="zeroshot", dataset=dict(folder, templates=["a {} shape", "the {}"])),
    },
    predict={name: sharding.host_fn(fn, mesh) for name, fn in fns.items()},
    tokenizer=tokenizer,
    data_config=dict(
      name="files", image_size=16, max_len=12, tokenizer="shapes_words", val=args["data"]["val"]
    ),
    default_batch_size=EVAL_BATCH,
  )
  out = {"metrics": {}, "decoded": {}}
  for name, ev in evaluators.items():
    out["metrics"][name] = ev.run(params)
    out["decoded"][name] = (ev.rows if name == "zs" else ev.images).decoded
  ret = evaluators["ret"]
  out["unreadable"] = retrieval.unreadable_images(ret.images).tolist()
  out["image_emb"] = ret.embed_images(params).tolist()
  out["devices"] = [jax.local_device_count(), jax.device_count()]
  pathlib.Path(args["out"]).write_text(json.dumps(out))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_eval_workers(tmp_path, worker: str, data: dict) -> tuple[dict, list[dict]]:
  """Runs `worker` as 2 processes x 2 devices and as 1 process x 4 devices, at once; returns
  what the one process wrote and what each of the two wrote."""
  port = _free_port()
  runs = [("two", i, 2, 2) for i in range(2)] + [("one", 0, 1, 4)]
  procs = []
  for tag, pid, count, devices in runs:
    args = dict(
      out=str(tmp_path / f"{tag}{pid}.json"),
      data=data,
      process_id=pid,
      num_processes=count,
      port=port,
    )
    env = testing.subprocess_env(devices, PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.abspath(__file__), worker, json.dumps(args)]
    with open(tmp_path / f"{tag}{pid}.log", "w") as log:  # a file: no pipe to fill and block
      procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=log))
  try:
    for proc, (tag, pid, _, _) in zip(procs, runs):
      proc.wait(timeout=300)
      assert proc.returncode == 0, (tmp_path / f"{tag}{pid}.log").read_text()[-4000:]
  finally:
    for proc in procs:
      if proc.poll() is None:  # a worker left waiting for a failed peer
        proc.kill()
        proc.wait()
  one = json.loads((tmp_path / "one0.json").read_text())
  two = [json.loads((tmp_path / f"two{i}.json").read_text()) for i in range(2)]
  return one, two


def test_evaluation_decodes_only_each_process_rows(tmp_path):
  """2 processes x 2 devices give the metrics and embeddings of 1 process x 4 devices, each
  decoding only the 8 of 16 images its devices hold; a truncated image counts once."""
  data = _write_eval_data(tmp_path)
  one, two = _run_eval_workers(tmp_path, "eval_worker", data)
  assert one["devices"] == [4, 4] and [t["devices"] for t in two] == [[2, 4], [2, 4]]
  for name in ("ret", "itm", "zs"):
    assert two[0]["metrics"][name] == two[1]["metrics"][name] == one["metrics"][name], name
    assert one["decoded"][name] == 16, name  # one process decodes every image
    assert [t["decoded"][name] for t in two] == [8, 8], name  # two: each its devices' half
  assert set(one["metrics"]["itm"]) > {"itc_rsum", "rsum"}
  # red/zz_bad.jpg (image 15) is decoded by process 1 only; process 0 counts it too (merged).
  assert one["metrics"]["zs"]["skipped_images"] == 1.0
  assert one["unreadable"] == two[0]["unreadable"] == two[1]["unreadable"] == [13]
  np.testing.assert_array_equal(two[0]["image_emb"], one["image_emb"])
  np.testing.assert_array_equal(two[1]["image_emb"], one["image_emb"])


def _lexical_worker(args: dict) -> None:
  """One process of sharded lexical evaluation: `patchdis` (both tasks) and `lexical_words` (on 14
  images: the last batch padded) of the shapes val split through `sharding.host_fn` on a mesh of
  every process's devices, with a small random lexical model; writes their metrics and decode
  counts to `args["out"]`."""
  import jax

  if args["num_processes"] > 1:
    jax.distributed.initialize(
      f"127.0.0.1:{args['port']}", args["num_processes"], args["process_id"]
    )
  import jax.numpy as jnp

  from vlalign import evaluation, sharding
  from vlalign.data.tokenizer import build_tokenizer

  tokenizer = build_tokenizer(dict(tokenizer="shapes_words"))
  vocab = tokenizer.vocab_size

  def lexical_patches(params, images):  # [B, 32, 32, 3] -> [B, 16, V]: 8x8 patch means, projected
    means = images.reshape(len(images), 4, 8, 4, 8, 3).mean(axis=(2, 4)).reshape(-1, 16, 3)
    return jax.nn.relu(means @ params["patch"] + params["bias"])

  def lexical_image(params, images):
    return jnp.max(lexical_patches(params, images), axis=1)

  def lexical_text(params, ids, mask):
    return jax.nn.relu((params["words"][ids] * mask[..., None]).sum(axis=1))

  fns = {
    "lexical_patches": lexical_patches,
    "lexical_image": lexical_image,
    "lexical_text": lexical_text,
    "lexicon_ids": lambda params: jnp.arange(vocab),
  }
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  rng = np.random.default_rng(2)
  params = {
    "patch": rng.normal(size=(3, vocab)).astype(np.float32),
    "bias": rng.normal(size=(vocab,)).astype(np.float32),
    "words": rng.normal(size=(vocab, vocab)).astype(np.float32),
  }
  params = jax.device_put(params, sharding.replicated(mesh))
  evaluators = evaluation.build_evaluators(
    {
      "shape": dict(type="patchdis", split="val"),
      "color": dict(type="patchdis", split="val", task="color", background_threshold=0.5),
      "words": dict(type="lexical_words", split="val", k=3, max_images=14),
    },
    predict={name: sharding.host_fn(fn, mesh) for name, fn in fns.items()},
    tokenizer=tokenizer,
    data_config=dict(name="shapes", image_size=32, max_len=12, val_size=16, seed=0),
    default_batch_size=EVAL_BATCH,
  )
  out = {"metrics": {}, "decoded": {}}
  for name, ev in evaluators.items():
    out["metrics"][name] = ev.run(params)
    out["decoded"][name] = ev.decoded
  out["devices"] = [jax.local_device_count(), jax.device_count()]
  pathlib.Path(args["out"]).write_text(json.dumps(out))


def test_lexical_evaluation_decodes_only_each_process_rows(tmp_path):
  """patchdis and lexical_words on 2 processes x 2 devices give the metrics of 1 process x 4
  devices, each process loading only the images its devices hold (the padding rows of the last
  lexical_words batch once)."""
  one, two = _run_eval_workers(tmp_path, "lexical_worker", {})
  assert one["devices"] == [4, 4] and [t["devices"] for t in two] == [[2, 4], [2, 4]]
  for name in ("shape", "color", "words"):
    assert two[0]["metrics"][name] == two[1]["metrics"][name] == one["metrics"][name], name
  assert one["decoded"] == {"shape": 16, "color": 16, "words": 14}
  # 16 images: 8 each. 14: rows 0-3 and 8-11 on process 0; 4-7 and 12-13 (+ 2 repeats of 13) on 1.
  assert [t["decoded"] for t in two] == [
    {"shape": 8, "color": 8, "words": 8},
    {"shape": 8, "color": 8, "words": 6},
  ]
  # The metrics say something: neither empty nor trivially perfect.
  assert 0 < one["metrics"]["shape"]["pixel_acc"] < 100
  assert one["metrics"]["words"]["active"] > 0


if __name__ == "__main__" and sys.argv[1:2] == ["eval_worker"]:
  _eval_worker(json.loads(sys.argv[2]))
if __name__ == "__main__" and sys.argv[1:2] == ["lexical_worker"]:
  _lexical_worker(json.loads(sys.argv[2]))
