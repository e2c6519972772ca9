r"""Prints docs/results.md rows from finished workdirs.

  python bench/results_table.py workdirs/clip_demo workdirs/siglip_demo

Reads each workdir's final_metrics.json (test-split retrieval, zero-shot accuracies); the wall-clock
time of each run, measured with `time`, is passed as NAME=TIME pairs, e.g. --wall clip_demo=8m31s.
"""

import argparse
import json
import os

COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def row(workdir: str, wall: dict[str, str]) -> str:
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    final = json.load(f)
  name = os.path.basename(os.path.normpath(workdir))
  cells = [f"{final[f'eval/retrieval_test/{c}']:.1f}" for c in COLUMNS]
  cells += [f"{final[f'eval/zeroshot_{t}/acc']:.1f}" for t in ("color", "shape")]
  return f"| {name} | {final['step']} | " + " | ".join(cells) + f" | {wall.get(name, '?')} |"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--wall", nargs="*", default=[], help="NAME=TIME, e.g. clip_demo=8m31s")
  args = parser.parse_args()
  wall = dict(item.split("=", 1) for item in args.wall)
  header = ["run", "steps", *[f"test {c}" for c in COLUMNS], "zs colour", "zs shape", "wall"]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for workdir in args.workdirs:
    print(row(workdir, wall))


if __name__ == "__main__":
  main()
