"""Host memory of a retrieval evaluation on files: streamed (`ImageRows`) vs the whole split loaded.

    python bench/eval_memory.py --sizes=500,2000 --image_size=224

For each size N it writes N test images with 5 captions each (the embedded data as ALBEF JSON +
JPEG, `vlalign.data.shapes_to_files`), then, in a fresh process per measurement, builds the
retrieval evaluator from a `data.name = "files"` config and runs it with a small jitted encoder
(patch-mean + projection: the model's memory is not what is measured). It prints the process's
resident memory after start-up (JAX, the jitted encoder) and its peak during the evaluation, next
to the float32 size of the split's pixels, for the streamed path and for the same images stacked
in one array (what the evaluator held before streaming).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, resource, sys
import jax, jax.numpy as jnp, numpy as np
from vlalign.data import pipeline
from vlalign.data.tokenizer import build_tokenizer
from vlalign.evaluation.retrieval import RetrievalEvaluator

root, size, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
config = dict(name="files", image_size=size, max_len=24, tokenizer="shapes_words", eval_threads=2,
              test=dict(format="albef_json", ann=f"{root}/test.json", image_root=root))
tokenizer = build_tokenizer(config)
proj = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
image_fn = jax.jit(lambda p, x: jnp.mean(x, axis=(1, 2)) @ p)
text_fn = jax.jit(lambda p, ids, mask: jax.nn.one_hot(ids[:, 1] % 64, 64))
image_fn(proj, np.zeros((64, size, size, 3), np.float32)).block_until_ready()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data = pipeline.make_eval_data(config, tokenizer, "test")
if mode == "loaded":
  data["images"] = data["images"][np.arange(len(data["images"]))]
evaluator = RetrievalEvaluator("r", image_fn, text_fn, data, batch_size=64, every_steps=0)
metrics = evaluator.run(proj)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_mib": base / 1024, "peak_mib": peak / 1024, "i2t_r1": metrics["i2t_r1"]}))
"""


def _measure(root: str, size: int, mode: str) -> dict:
  out = subprocess.run(
    [sys.executable, "-c", _CHILD, root, str(size), mode],
    capture_output=True,
    text=True,
    check=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="500,2000", help="comma-separated numbers of images")
  parser.add_argument("--image_size", type=int, default=224)
  args = parser.parse_args()
  from vlalign.data import shapes_to_files  # noqa: PLC0415

  print(
    "| images | float32 pixels (MiB) | process after start-up (MiB) | peak, streamed (MiB) "
    "| peak, loaded (MiB) |"
  )
  print("|---|---|---|---|---|")
  for count in [int(n) for n in args.sizes.split(",")]:
    with tempfile.TemporaryDirectory() as root:
      shapes_to_files.write(root, "albef_json", {"test": count}, image_size=args.image_size)
      pixels = count * args.image_size**2 * 3 * 4 / 2**20
      streamed = _measure(root, args.image_size, "streamed")
      loaded = _measure(root, args.image_size, "loaded")
      print(
        f"| {count} | {pixels:.0f} | {streamed['base_mib']:.0f} | {streamed['peak_mib']:.0f} "
        f"| {loaded['peak_mib']:.0f} |",
        flush=True,
      )


if __name__ == "__main__":
  main()
