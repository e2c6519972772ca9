"""Evaluation reports: `eval_step{step}.json` and a markdown table, `eval_step{step}.md`.

The markdown table has one row per evaluator and one column per metric name (the union over
evaluators, in first-seen order); a metric an evaluator lacks is shown as `-`, numbers with two
decimals. In the JSON file non-finite numbers are written as `null`, so any JSON parser reads it.
"""

import json
import math
import numbers
from collections.abc import Mapping
from typing import Any

from vlalign import workdir as workdir_lib

Results = Mapping[str, Mapping[str, float]]


def _format_cell(value: Any) -> str:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return str(value)
  return f"{float(value):.2f}"


def markdown_table(rows: Results, first_column: str = "evaluator") -> str:
  """A markdown table with one row per entry of `rows` (`{row name: {column: value}}`)."""
  columns: list[str] = []
  for metrics in rows.values():
    columns += [c for c in metrics if c not in columns]
  lines = [
    "| " + " | ".join([first_column, *columns]) + " |",
    "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|",
  ]
  for name, metrics in rows.items():
    cells = [_format_cell(metrics[c]) if c in metrics else "-" for c in columns]
    lines.append("| " + " | ".join([name, *cells]) + " |")
  return "\n".join(lines) + "\n"


def _json_number(value: Any) -> Any:
  value = float(value)
  return value if math.isfinite(value) else None


def report_paths(out_dir: str, step: int, tag: str = "") -> tuple[Any, Any]:
  """`(json path, md path)`: `eval_step{step}{tag}.json` and `.md` in `out_dir`."""
  out = workdir_lib.as_path(out_dir)
  return out / f"eval_step{step}{tag}.json", out / f"eval_step{step}{tag}.md"


def write_report(
  results: Results, out_dir: str, step: int, header: str, tag: str = ""
) -> tuple[str, str]:
  """Writes `eval_step{step}{tag}.json` and `.md` into `out_dir` (a local directory or a URI,
  created if missing), each atomically.

  Args:
    results: `{evaluator name: {metric: value}}`.
    out_dir: the directory to write into.
    step: the train step the parameters come from.
    header: a title line for the markdown report (e.g. the config name and workdir).
    tag: appended to the file names (e.g. `.override`), so other results are never overwritten.

  Returns:
    `(json_path, md_path)`.
  """
  json_path, md_path = report_paths(out_dir, step, tag)
  payload = {
    "step": int(step),
    "header": header,
    "results": {
      name: {k: _json_number(v) for k, v in metrics.items()} for name, metrics in results.items()
    },
  }
  workdir_lib.write_text(json_path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
  title = f"# Evaluation at step {step}" + (f": {header.strip()}" if header.strip() else "")
  workdir_lib.write_text(md_path, f"{title}\n\n{markdown_table(results)}")
  return str(json_path), str(md_path)
