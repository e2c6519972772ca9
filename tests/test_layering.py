"""The core stays generic: the step and the trainer name no method, queue or model output, and
models never import losses (what they need is passed in)."""

import os
import re

import pytest

from vlalign import losses, methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ("vlalign/step.py", "vlalign/trainer.py")
METHOD_NAMES = ("clip", "siglip", "albef", "tcl", "codis", "lexvla")
# Quoted keys of queues, model outputs, teacher outputs and method inputs.
KEY_PATTERN = r"[\"'](img|txt|itm|mlm|queue|teacher)/|logit_(scale|bias)|mlm_(ids|labels)|alpha"


def _source(path):
  with open(os.path.join(ROOT, path)) as f:
    return f.read()


@pytest.mark.parametrize("path", CORE)
def test_core_names_no_method_queue_or_output_key(path):
  text = _source(path)
  names = (*METHOD_NAMES, *methods.METHODS.names())
  for name in names:
    assert not re.search(rf"\b{re.escape(name)}\b", text, re.IGNORECASE), (path, name)
  assert not re.search(KEY_PATTERN, text), (path, re.search(KEY_PATTERN, text))


def test_models_never_import_losses():
  models_dir = os.path.join(ROOT, "vlalign", "models")
  for name in os.listdir(models_dir):
    if name.endswith(".py"):
      source = _source(os.path.join("vlalign", "models", name))
      assert not re.search(r"^\s*(from|import) vlalign\.losses", source, re.MULTILINE), name


def test_registries_find_every_module_without_an_import_list():
  assert {"two_tower", "momentum"} <= set(methods.METHODS.names())
  assert {"itc", "siglip", "cma", "imc", "lmi", "tcl_ita", "itm", "mlm"} <= set(losses.names())
