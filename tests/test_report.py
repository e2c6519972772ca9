import json
import math

from vlalign.evaluation import report

RESULTS = {
  "retrieval_val": {"i2t_r1": 12.345, "t2i_r1": 7.0, "rsum": 19.345},
  "zeroshot_color": {"acc": 50.0, "chance": 100.0 / 3},
}


def test_markdown_table_layout():
  table = report.markdown_table(RESULTS)
  assert table.splitlines() == [
    "| evaluator | i2t_r1 | t2i_r1 | rsum | acc | chance |",
    "|---|---:|---:|---:|---:|---:|",
    "| retrieval_val | 12.35 | 7.00 | 19.34 | - | - |",
    "| zeroshot_color | - | - | - | 50.00 | 33.33 |",
  ]


def test_write_report_files(tmp_path):
  out_dir = tmp_path / "new_dir"
  results = {**RESULTS, "broken": {"acc": math.nan}}
  json_path, md_path = report.write_report(results, str(out_dir), 120, header="clip tiny /w")
  assert json_path == str(out_dir / "eval_step120.json")
  assert md_path == str(out_dir / "eval_step120.md")
  with open(json_path) as f:
    payload = json.load(f)
  assert payload["step"] == 120 and payload["header"] == "clip tiny /w"
  assert payload["results"]["retrieval_val"] == RESULTS["retrieval_val"]
  assert payload["results"]["zeroshot_color"]["chance"] == RESULTS["zeroshot_color"]["chance"]
  assert payload["results"]["broken"] == {"acc": None}  # strict JSON: NaN becomes null
  md = (out_dir / "eval_step120.md").read_text()
  assert md.startswith("# Evaluation at step 120: clip tiny /w\n\n")
  assert md.endswith(report.markdown_table(results))
  assert "| broken | - | - | - | nan | - |" in md
