"""Learning-curve PNG drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

__all__ = ["plot_history"]

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def _panel(draw, box, series: Sequence[Tuple[str, List[float]]], xs: List[int], title: str) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0 + 4, y0 - 14), title, fill=(0, 0, 0))
    vals = [v for _, s in series for v in s if v is not None]
    if not vals or not xs:
        return
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    xmin, xmax = min(xs), max(xs)
    span = xmax - xmin

    def pt(x, v):  # a single epoch sits in the middle
        fx = (x - xmin) / span if span else 0.5
        return (x0 + fx * (x1 - x0), y1 - (v - lo) / (hi - lo) * (y1 - y0))

    for frac in (0.0, 0.5, 1.0):
        v = lo + frac * (hi - lo)
        y = pt(xmin, v)[1]
        draw.line([(x0, y), (x0 + 4, y)], fill=(0, 0, 0))
        draw.text((x0 - 44, y - 6), f"{v:.3g}", fill=(0, 0, 0))
    if span:
        draw.text((x0, y1 + 4), f"epoch {xmin}", fill=(0, 0, 0))
        draw.text((x1 - 50, y1 + 4), f"epoch {xmax}", fill=(0, 0, 0))
    else:
        draw.text(((x0 + x1) / 2 - 20, y1 + 4), f"epoch {xmin}", fill=(0, 0, 0))
    for k, (name, s) in enumerate(series):
        color = COLORS[k % len(COLORS)]
        pts = [pt(x, v) for x, v in zip(xs, s) if v is not None]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for p in pts:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        draw.text((x1 - 120, y0 + 6 + 14 * k), name, fill=color)


def plot_history(history: List[Dict], path, title: str = "") -> Path:
    """Draw loss (train/test) and top-1 (train/test) per epoch into a PNG."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (900, 380), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((10, 6), title, fill=(0, 0, 0))
    xs = [h["epoch"] for h in history]
    _panel(
        d,
        (60, 40, 430, 340),
        [("train loss", [h["train_loss"] for h in history]), ("test loss", [h["test_loss"] for h in history])],
        xs,
        "loss",
    )
    _panel(
        d,
        (510, 40, 880, 340),
        [("train top-1", [h["train_top1"] for h in history]), ("test top-1", [h["test_top1"] for h in history])],
        xs,
        "top-1 (%)",
    )
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path
