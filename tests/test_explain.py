"""The explain command's pure parts: top words, the explanation's JSON, the heat-map PNG, inputs."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import clip as clip_config
from vlalign import explain
from vlalign.errors import ConfigError, PathError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["zero", "one", "two", "three", "four", "five"]
LEXICON_IDS = np.array([10, 11, 12, 13, 14, 15])


def _decode(ids):
  return " ".join(WORDS[i - 10] for i in ids)


def test_top_words_best_first_without_inactive_entries():
  vector = np.array([0.1, 0.0, 0.7, 0.1, 0.0, 0.3], np.float32)
  got = explain.top_words(vector, LEXICON_IDS, _decode, 5)
  assert [(w["entry"], w["id"], w["word"]) for w in got] == [
    (2, 12, "two"),
    (5, 15, "five"),
    (0, 10, "zero"),  # ties: the lower entry first
    (3, 13, "three"),
  ]
  assert [w["score"] for w in got] == pytest.approx([0.7, 0.3, 0.1, 0.1])
  assert [w["word"] for w in explain.top_words(vector, LEXICON_IDS, _decode, 2)] == ["two", "five"]
  assert explain.top_words(np.zeros(6), LEXICON_IDS, _decode, 3) == []


def _patch_vectors():
  """A 2 x 2 grid: patch (0, 1) says "three", patch (1, 0) "one" then "four", the others nothing."""
  patch_lex = np.zeros((4, 6), np.float32)
  patch_lex[1, 3] = 0.9
  patch_lex[2, [1, 4]] = [0.6, 0.2]
  return patch_lex


def test_explanation_structure():
  patch_lex = _patch_vectors()
  got = explain.explanation(patch_lex.max(axis=0), patch_lex, LEXICON_IDS, _decode, topk=2)
  assert json.loads(json.dumps(got)) == got  # plain JSON types only
  assert got["grid"] == 2
  assert [(w["word"], w["score"]) for w in got["top_words"]] == [
    ("three", pytest.approx(0.9)),
    ("one", pytest.approx(0.6)),
  ]
  assert [(p["row"], p["col"]) for p in got["patches"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  assert [[w["word"] for w in p["words"]] for p in got["patches"]] == [
    [],
    ["three"],
    ["one", "four"],
    [],
  ]
  assert set(got["patches"][2]["words"][0]) == {"entry", "id", "word", "score"}
  scores, words = explain.map_scores(got, patch_lex, 4)
  assert words == ["three", "one"]
  np.testing.assert_array_equal(scores, np.float32([[0, 0.9, 0, 0], [0, 0, 0.6, 0]]))
  with pytest.raises(ValueError, match="square"):
    explain.explanation(np.zeros(6), np.zeros((3, 6)), LEXICON_IDS, _decode, 2)
  with pytest.raises(ValueError, match="lexicon"):
    explain.explanation(np.zeros(6), np.zeros((4, 5)), LEXICON_IDS, _decode, 2)


def _decoded(png):
  picture = Image.open(io.BytesIO(png))
  assert picture.format == "PNG"
  return np.asarray(picture.convert("RGB"))


def test_heatmap_png_size_and_where_it_is_hot():
  size = 32
  image = np.full((size, size, 3), 128, np.uint8)
  image[:4, :4] = (0, 200, 0)
  scores = np.zeros((3, 16), np.float32)  # a 4 x 4 grid of 8-pixel patches, row-major
  scores[0, 3 * 4 + 0] = 2.0  # word 0: patch (row 3, col 0), the bottom-left corner
  scores[1, 0 * 4 + 3] = 0.5  # word 1: patch (row 0, col 3), the top-right corner
  png = explain.heatmap_png(image, scores, ["bottom", "top", "nothing"])
  pixels = _decoded(png)
  width, height = explain.png_size(size, 3)
  assert pixels.shape == (height, width, 3)
  side = explain.panel_side(size)
  assert side == 192 and width == 4 * side + 5 * explain.GAP
  top, step = explain.GAP + explain.TITLE, side + explain.GAP
  panels = [pixels[top : top + side, explain.GAP + i * step :][:, :side] for i in range(4)]
  scale = side // size
  np.testing.assert_array_equal(panels[0], np.kron(image, np.ones((scale, scale, 1), np.uint8)))

  def blended(y, x, heat):  # what the heat map shows at image pixel (y, x) for a given heat
    return explain.blend_heat(image[y : y + 1, x : x + 1], np.full((1, 1), heat))[0, 0]

  # Pixels within half a patch of the image's edge take the edge patch's score unmixed.
  for panel, (hot_y, hot_x), (cold_y, cold_x) in [(1, (30, 1), (1, 30)), (2, (1, 30), (30, 1))]:
    hot = panels[panel][hot_y * scale, hot_x * scale]
    cold = panels[panel][cold_y * scale, cold_x * scale]
    np.testing.assert_allclose(hot, blended(hot_y, hot_x, 1.0), atol=1)  # scaled by the maximum
    np.testing.assert_allclose(cold, blended(cold_y, cold_x, 0.0), atol=1)
    assert hot[0] > 200 and hot[0] > int(cold[0]) + 80  # yellow on the patch, blue-grey elsewhere
  cold_map = explain.blend_heat(image, np.zeros((size, size)))  # no positive score: all cold
  np.testing.assert_array_equal(panels[3], np.kron(cold_map, np.ones((scale, scale, 1), np.uint8)))
  one = _decoded(explain.heatmap_png(image, scores[0], ["bottom"]))  # [N] for one word
  assert one.shape == (explain.png_size(size, 1)[1], explain.png_size(size, 1)[0], 3)
  no_maps = _decoded(explain.heatmap_png(image, np.zeros((0, 16)), []))
  assert no_maps.shape[1] == side + 2 * explain.GAP
  with pytest.raises(ValueError, match="words"):
    explain.heatmap_png(image, scores, ["one"])


def test_heat_colours_ramp():
  np.testing.assert_allclose(explain.heat_colours(np.array([0.0, 0.5, 1.0])), explain._RAMP)
  np.testing.assert_allclose(
    explain.heat_colours(np.array(0.25)), (explain._RAMP[0] + explain._RAMP[1]) / 2
  )


def test_load_image_crops_and_resizes(tmp_path):
  wide = np.zeros((20, 40, 3), np.uint8)
  wide[:, 10:30] = (255, 0, 0)  # the centre square is red, the sides black
  path = tmp_path / "wide photo.png"
  Image.fromarray(wide).save(path)
  got = explain.load_image(str(path), 16)
  assert got.shape == (16, 16, 3) and got.dtype == np.uint8
  assert np.all(got[..., 0] > 250) and np.all(got[..., 1:] < 5)
  assert explain.output_name("test", 3, None) == "test3"
  assert explain.output_name("test", 3, str(path)) == "wide_photo"
  with pytest.raises(PathError, match="no file"):
    explain.load_image(str(tmp_path / "missing.png"), 16)
  (tmp_path / "broken.png").write_bytes(b"not an image")
  with pytest.raises(PathError, match="cannot decode"):
    explain.load_image(str(tmp_path / "broken.png"), 16)


def test_split_image_and_its_range():
  data = dict(name="shapes", image_size=32, test_size=4, seed=0)
  image = explain.split_image(data, "test", 3)
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  with pytest.raises(ConfigError, match="out of range"):
    explain.split_image(data, "test", 4)


def test_explain_without_checkpoints_is_a_user_error(tmp_path):
  config = clip_config.get_config("tiny")
  with pytest.raises(PathError, match="no checkpoints"):
    explain.explain(config, str(tmp_path / "nowhere"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_command_reports_user_errors_in_one_line(tmp_path):
  base = [sys.executable, "-m", "vlalign.explain", "--config=configs/clip.py:tiny"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  for flags, message in [
    ([f"--workdir={tmp_path / 'nowhere'}"], "no checkpoints/ in"),
    ([f"--workdir={tmp_path}", "--image=x.png", "--index=2"], "either --image or --split"),
  ]:
    run = subprocess.run(base + flags, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], run.stderr
    assert "Traceback" not in run.stderr
