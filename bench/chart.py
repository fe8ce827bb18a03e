"""PNG charts drawn with Pillow (already a dependency), so benchmarks need no plotting library."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

INK = (30, 30, 30)
BAR = (52, 110, 190)
LIMIT = (200, 60, 40)
GRID = (225, 225, 225)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=14)


def bar_chart(rows: Sequence[tuple[str, float, float]], *, title: str, path: Path) -> Path:
    """Horizontal bars (label, value, limit): the value as a bar, the limit as a red tick."""
    font = _font()
    label_w, bar_w, row_h, top = 330, 520, 30, 50
    width, height = label_w + bar_w + 90, top + row_h * len(rows) + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 12), title, fill=INK, font=font)
    top_value = max(max(v, lim) for _, v, lim in rows) * 1.05 or 1.0
    scale = bar_w / top_value
    for tick in range(0, int(top_value) + 1, max(1, int(top_value / 8))):
        x = label_w + tick * scale
        draw.line([(x, top - 5), (x, height - 35)], fill=GRID)
        draw.text((x - 6, height - 30), str(tick), fill=INK, font=font)
    for i, (label, value, limit) in enumerate(rows):
        y = top + i * row_h
        draw.text((10, y + 6), label[:42], fill=INK, font=font)
        draw.rectangle([label_w, y + 5, label_w + value * scale, y + row_h - 5], fill=BAR)
        draw.text((label_w + value * scale + 4, y + 6), f"{value:.2f}", fill=INK, font=font)
        lx = label_w + limit * scale
        draw.line([(lx, y + 2), (lx, y + row_h - 2)], fill=LIMIT, width=3)
    image.save(path)
    return path


def line_chart(xs: Sequence[float], ys: Sequence[float], *, title: str, x_label: str, y_label: str, path: Path) -> Path:
    """One series as a polyline with min/max axis labels (the soak's RSS curve)."""
    font = _font()
    width, height, left, right, top, bottom = 900, 430, 80, 20, 60, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill=INK, font=font)
    x0, x1 = min(xs), max(xs) or 1.0
    y0, y1 = 0.0, max(ys) * 1.1 or 1.0
    pw, ph = width - left - right, height - top - bottom

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / ((x1 - x0) or 1.0) * pw, top + ph - (y - y0) / (y1 - y0) * ph

    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y0 + frac * (y1 - y0)
        _, py = at(x0, y)
        draw.line([(left, py), (width - right, py)], fill=GRID)
        draw.text((5, py - 8), f"{y:.0f}", fill=INK, font=font)
    draw.line([at(x, y) for x, y in zip(xs, ys, strict=True)], fill=BAR, width=2)
    draw.text((left, height - 30), f"{x0:.0f}", fill=INK, font=font)
    draw.text((width - right - 60, height - 30), f"{x1:.0f}", fill=INK, font=font)
    draw.text((width // 2 - 60, height - 30), x_label, fill=INK, font=font)
    draw.text((5, top - 22), y_label, fill=INK, font=font)
    image.save(path)
    return path
