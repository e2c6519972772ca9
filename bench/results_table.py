r"""Prints docs/results.md rows from finished workdirs.

  python bench/results_table.py workdirs/clip_demo workdirs/siglip_demo

Reads each workdir's final_metrics.json (test-split retrieval, zero-shot accuracies); the wall-clock
time of each run, measured with `time`, is passed as NAME=TIME pairs, e.g. --wall clip_demo=8m31s.
Runs with a `retrieval_itm_test` evaluator (ALBEF, TCL) also get a second table: R@1/5/10 both ways
ranked by ITC alone and after ITM re-ranking of the top-k.
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


def itm_row(workdir: str) -> str | None:
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    final = json.load(f)
  prefix = "eval/retrieval_itm_test/"
  if f"{prefix}i2t_r1" not in final:
    return None
  name = os.path.basename(os.path.normpath(workdir))
  cells = [f"{final[f'{prefix}itc_{c}']:.1f}" for c in COLUMNS]
  cells += [f"{final[f'{prefix}{c}']:.1f}" for c in COLUMNS]
  return f"| {name} | " + " | ".join(cells) + " |"


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
  itm_rows = [r for r in map(itm_row, args.workdirs) if r is not None]
  if itm_rows:
    header = ["run", *[f"ITC {c}" for c in COLUMNS], *[f"ITM {c}" for c in COLUMNS]]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("\n".join(itm_rows))


if __name__ == "__main__":
  main()
