"""The step benchmark as a picture: images/s per configuration, one group of bars per model.

``plot_step(payload, path)`` draws the ``step`` rows of a results payload (what
:func:`benchmarks.harness.write_results` writes as ``results.json``) into a PNG with Pillow:
for each case (MAE ViT-B/16, ViT-L/16, BEiT-B) a bar per variant, its length images/s, labelled
with images/s, MFU and peak memory. ``python -m benchmarks.report results.json`` redraws it for
a committed run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["plot_step"]

WIDTH = 1000
LABEL_W = 220  # variant names
BAR_H = 22
GAP = 6
GROUP_GAP = 26
COLORS = {"eager": (150, 150, 150), "timm-sdpa": (120, 150, 200), "timm-sdpa+compile": (70, 110, 180),
          "mimfast": (230, 120, 40), "mimfast+compile": (190, 80, 20)}
OTHER = (240, 170, 110)


def _rows(payload: dict) -> dict:
    """case -> [(variant, images/s, mfu %, peak MiB)] of the step rows that have a figure."""
    cases: dict = {}
    for r in payload.get("rows", []):
        ips = r.get("images_per_s")
        if r.get("bench") != "step" or ips is None or not ips == ips:  # NaN: a failed variant
            continue
        cases.setdefault(r["case"], []).append((r["variant"], float(ips), r.get("mfu_pct"), r.get("peak_mem_mib")))
    return cases


def plot_step(payload: dict, path: Path) -> Path | None:
    """Write the images/s bar chart to ``path``; None (nothing written) without step rows."""
    cases = _rows(payload)
    if not cases:
        return None
    font = ImageFont.load_default()
    title_h = 46
    height = title_h + sum(20 + len(v) * (BAR_H + GAP) + GROUP_GAP for v in cases.values())
    img = Image.new("RGB", (WIDTH, height), "white")
    d = ImageDraw.Draw(img)
    info = payload.get("info", {})
    smoke = " (smoke run: figures mean nothing)" if payload.get("smoke") else ""
    d.text((10, 8), f"mimfast pretraining step, images/s - {info.get('device')}{smoke}", fill="black", font=font)
    d.text((10, 24), f"torch {info.get('torch')}, triton {info.get('triton')}, {info.get('date')}; bf16 autocast, "
                     "forward + backward + fused AdamW", fill=(80, 80, 80), font=font)
    y = title_h
    bar_max = WIDTH - LABEL_W - 230
    for case, bars in cases.items():
        d.text((10, y), case, fill="black", font=font)
        y += 20
        top = max(b[1] for b in bars) or 1.0
        for variant, ips, mfu, peak in bars:
            d.text((20, y + 5), variant, fill="black", font=font)
            w = max(1, int(bar_max * ips / top))
            d.rectangle([LABEL_W, y, LABEL_W + w, y + BAR_H], fill=COLORS.get(variant, OTHER))
            note = f"{ips:,.0f} img/s"
            if mfu is not None:
                note += f", MFU {mfu}%"
            if peak is not None:
                note += f", {peak / 1024:.1f} GiB"
            d.text((LABEL_W + w + 8, y + 5), note, fill="black", font=font)
            y += BAR_H + GAP
        y += GROUP_GAP
    path = Path(path)
    img.save(path)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.report RESULTS_JSON", file=sys.stderr)
        return 2
    src = Path(argv[0])
    out = plot_step(json.loads(src.read_text()), src.with_name("step.png"))
    print(out or "no step rows in this run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
