"""The binaries' shared error reporting (vlalign/cli.py)."""

import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
  from vlalign import cli

  class Raises:
    def __init__(self, error):
      self.error = error

    def __del__(self):
      raise self.error

  cli._quiet_closed_loop_noise()
  Raises(RuntimeError("Event loop is closed"))  # TensorStore's late callback: filtered
  Raises(ValueError("a real bug"))  # anything else: still reported
  print("done")
""")


def test_a_late_callback_on_a_closed_loop_prints_no_traceback_and_a_real_error_still_does():
  result = subprocess.run(
    [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120, check=True
  )
  assert result.stdout.strip() == "done"
  assert "Event loop is closed" not in result.stderr
  assert "ValueError: a real bug" in result.stderr
