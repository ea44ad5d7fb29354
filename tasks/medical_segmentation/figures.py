"""Pictures for people: organ overlays on a CT slice, and per-organ Dice bars.

``overlay_panel`` shows one slice three times (CT, ground truth, prediction), each organ in its
own colour, above a legend row naming the colours; ``dice_bars`` draws the per-organ mean Dice
of a whole test split as horizontal bars. Both return (3, H, W) float images in [0, 1].
"""

from __future__ import annotations

import colorsys
import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# One colour per Synapse organ, in TransUNet's label order (aorta ... stomach).
PALETTE = (
    (230, 25, 75),  # aorta: red
    (60, 180, 75),  # gallbladder: green
    (255, 225, 25),  # left kidney: yellow
    (0, 130, 200),  # right kidney: blue
    (245, 130, 48),  # liver: orange
    (145, 30, 180),  # pancreas: purple
    (70, 240, 240),  # spleen: cyan
    (240, 50, 230),  # stomach: magenta
)
ALPHA = 0.5
MIN_TILE = 160  # slices smaller than this are enlarged (nearest neighbour) to stay legible


def organ_colours(count: int) -> list[tuple[int, int, int]]:
    """The palette, extended with evenly spaced hues when there are more organs."""
    extra = [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(1, count), 0.8, 0.95)) for i in range(count)]
    return (list(PALETTE) + extra)[:count]


def _font(size: int = 11) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _tile(ct: np.ndarray, labels: np.ndarray | None, colours: list[tuple[int, int, int]], scale: int) -> Image.Image:
    grey = np.repeat((np.clip(ct, 0, 1) * 255)[..., None], 3, axis=2)
    if labels is not None:
        lut = np.array([(0, 0, 0), *colours], dtype=np.float64)
        organ = labels > 0
        grey[organ] = (1 - ALPHA) * grey[organ] + ALPHA * lut[np.clip(labels[organ], 0, len(colours))]
    tile = Image.fromarray(grey.round().astype(np.uint8))
    return tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST) if scale > 1 else tile


def overlay_panel(ct: torch.Tensor, truth: torch.Tensor | None, prediction: torch.Tensor, organs: Sequence[str], title: str = "") -> torch.Tensor:
    """CT | CT + ground truth | CT + prediction, with a legend row; one (3, H, W) image."""
    colours = organ_colours(len(organs))
    ct_np, pred_np = ct.float().cpu().numpy(), prediction.cpu().numpy()
    scale = max(1, math.ceil(MIN_TILE / min(ct_np.shape)))
    tiles, captions = [_tile(ct_np, None, colours, scale)], [f"CT {title}".strip()]
    if truth is not None:
        tiles.append(_tile(ct_np, truth.cpu().numpy(), colours, scale))
        captions.append("ground truth")
    tiles.append(_tile(ct_np, pred_np, colours, scale))
    captions.append("prediction")
    font, gap, head = _font(), 4, 16
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    per_row = max(1, width // 110)
    legend_rows = math.ceil(len(organs) / per_row)
    canvas = Image.new("RGB", (width, head + tiles[0].height + 6 + 16 * legend_rows), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for tile, caption in zip(tiles, captions):
        draw.text((x + 2, 2), caption, fill="black", font=font)
        canvas.paste(tile, (x, head))
        x += tile.width + gap
    top = head + tiles[0].height + 6
    cell = width // per_row
    for i, (name, colour) in enumerate(zip(organs, colours)):
        cx, cy = (i % per_row) * cell, top + (i // per_row) * 16
        draw.rectangle((cx + 2, cy + 2, cx + 12, cy + 12), fill=colour, outline="black")
        draw.text((cx + 16, cy), name, fill="black", font=font)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255


def dice_bars(values: dict[str, float], title: str = "mean Dice per organ (test)") -> torch.Tensor:
    """Horizontal bars of per-organ Dice in [0, 1], each in its organ's colour; (3, H, W)."""
    font, row, label_width, bar_width = _font(), 18, 110, 260
    colours = organ_colours(len(values))
    canvas = Image.new("RGB", (label_width + bar_width + 50, 22 + row * len(values)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), title, fill="black", font=font)
    for i, ((name, value), colour) in enumerate(zip(values.items(), colours)):
        y = 22 + i * row
        draw.text((4, y + 2), name, fill="black", font=font)
        length = 0 if math.isnan(value) else int(round(bar_width * min(max(value, 0.0), 1.0)))
        draw.rectangle((label_width, y + 2, label_width + bar_width, y + row - 3), outline=(200, 200, 200))
        if length:
            draw.rectangle((label_width, y + 2, label_width + length, y + row - 3), fill=colour)
        draw.text((label_width + bar_width + 4, y + 2), "n/a" if math.isnan(value) else f"{value:.3f}", fill="black", font=font)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255
