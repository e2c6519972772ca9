"""Small PNG charts drawn with Pillow (no plotting library needed)."""

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 900, 320, 40


def bar_chart_png(values: Sequence[float], title: str, xlabel: str = "") -> bytes:
  """A bar chart of `values` (one bar each, in order) as PNG bytes, with the title, the maximum
  and the x range written on it."""
  values = np.asarray(values, np.float64)
  image = Image.new("RGB", (WIDTH, HEIGHT), "white")
  draw = ImageDraw.Draw(image)
  draw.text((MARGIN, 8), title, fill="black")
  top = float(values.max()) if values.size and values.max() > 0 else 1.0
  plot_w, plot_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN - 10
  base = HEIGHT - MARGIN
  draw.line([(MARGIN, base), (WIDTH - MARGIN, base)], fill="black")
  draw.line([(MARGIN, base), (MARGIN, base - plot_h)], fill="black")
  draw.text((4, base - plot_h - 4), f"{top:g}", fill="black")
  step = plot_w / max(len(values), 1)
  for i, value in enumerate(values):
    height = plot_h * max(float(value), 0.0) / top
    x0 = MARGIN + i * step
    x1 = max(x0 + max(step - 1, 1), x0 + 1)
    draw.rectangle([(x0, base - height), (x1, base)], fill=(60, 110, 180))
  draw.text((MARGIN, base + 6), "0", fill="black")
  draw.text((WIDTH - MARGIN - 40, base + 6), f"{len(values) - 1}", fill="black")
  if xlabel:
    draw.text((WIDTH // 2 - 4 * len(xlabel), base + 18), xlabel, fill="black")
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()
