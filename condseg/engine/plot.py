"""A PNG of the training curves drawn with Pillow (no plotting library needed)."""
import math

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _panel(draw, box, title, series, boundary=None):
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0 + 4, y0 - 14), title, fill=(0, 0, 0))
    points = [(x, y) for _, pts in series for x, y in pts if y is not None and math.isfinite(y)]
    if not points:
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    ymin, ymax = min(ys), max(ys)
    if ymax - ymin < 1e-9:
        ymin, ymax = ymin - 0.5, ymax + 0.5
    pad = 0.05 * (ymax - ymin)
    ymin, ymax = ymin - pad, ymax + pad

    def to_px(x, y):
        return (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0))

    for frac in (0.0, 0.5, 1.0):
        value = ymin + frac * (ymax - ymin)
        _, py = to_px(xmin, value)
        draw.line([(x0, py), (x0 + 4, py)], fill=(0, 0, 0))
        draw.text((x0 - 42, py - 6), f"{value:.3g}", fill=(0, 0, 0))
    draw.text((x1 - 60, y1 + 4), f"epoch {int(xmax)}", fill=(0, 0, 0))
    if boundary is not None and xmin < boundary < xmax:
        bx, _ = to_px(boundary, ymin)
        for y in range(int(y0), int(y1), 6):
            draw.line([(bx, y), (bx, y + 3)], fill=(128, 128, 128))
    for k, (name, pts) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        segment = []
        for x, y in pts + [(None, None)]:  # a None point ends a line (the stage boundary)
            if y is not None and math.isfinite(y):
                segment.append(to_px(x, y))
                continue
            if len(segment) > 1:
                draw.line(segment, fill=colour, width=2)
            for px, py in segment:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
            segment = []
        draw.text((x0 + 8, y0 + 6 + 12 * k), name, fill=colour)


def plot_history(history, path):
    """Loss curves (left) and validation metrics (right) over all epochs of both stages; a dashed
    line marks where stage 2 starts."""
    rows = list(history)
    for i, row in enumerate(rows):
        row = dict(row)
        row["_x"] = i + 1
        rows[i] = row
    stage2 = [r["_x"] for r in rows if r.get("stage") == 2]
    first2 = stage2[0] if stage2 and stage2[0] > 1 else None
    boundary = first2 - 0.5 if first2 else None

    def series(key):
        pts = [(r["_x"], r.get(key)) for r in rows if r.get(key) is not None]
        return [p for x, y in pts for p in ([(x, None)] if x == first2 else []) + [(x, y)]]

    img = Image.new("RGB", (960, 400), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    _panel(draw, (60, 30, 460, 360), "loss", [("train loss", series("train_loss")), ("val loss", series("val_loss"))],
           boundary)
    _panel(draw, (540, 30, 940, 360), "validation", [("mDSC", series("val_mDSC")), ("mIoU", series("val_mIoU"))],
           boundary)
    img.save(path)
    return path
