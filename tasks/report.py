"""The leaderboard as one self-contained HTML page: every table, and pictures of the results.

Each trained run contributes its test examples (the task's ``example_panels``: low-light input /
output / reference, organ overlays, echo frames with masks, a rendered room, a registration pair
before and after alignment) and its ``report_figures`` (a confusion matrix, ...). Images are
embedded as PNG data URIs, so the page is one file that can be mailed or archived. A small inline
script counts images that failed to decode and says so at the top of the page.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import torch
from PIL import Image

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }
th:nth-child(-n+3), td:nth-child(-n+3) { text-align: left; }
tr.trained { background: #eef5ff; }
figure { display: inline-block; margin: 0.5rem 1rem 1rem 0; vertical-align: top; }
figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
figcaption { font-size: 0.85rem; color: #555; }
#status.broken { color: #b00; font-weight: bold; }
"""

# Marks the page with how many images decoded; a broken image is announced, not hidden.
CHECK_SCRIPT = """
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((img) => !(img.complete && img.naturalWidth > 0));
  const status = document.getElementById("status");
  document.body.dataset.imagesOk = images.length - broken.length;
  document.body.dataset.imagesBroken = broken.length;
  document.body.dataset.tables = document.querySelectorAll("table").length;
  if (broken.length) { status.textContent = broken.length + " image(s) failed to load"; status.className = "broken"; }
});
"""


def png_data_uri(image: torch.Tensor) -> str:
    """A (3, H, W) image in [0, 1] as a ``data:image/png;base64,...`` URI."""
    pixels = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _table(headers: list[str], rows: list[list[str]], trained: list[bool]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        f'<tr class="{"trained" if is_trained else "baseline"}">' + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for cells, is_trained in zip(rows, trained)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(sections: list[dict[str, Any]], environment: dict[str, Any]) -> str:
    """The page: one section per task with its table and figures.

    Each section is ``{"task", "headers", "rows", "trained", "figures"}`` where ``figures`` is a
    list of ``(caption, image tensor)``.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>glocal leaderboard</title>',
        f"<style>{STYLE}</style><script>{CHECK_SCRIPT}</script></head><body>",
        "<h1>Leaderboard</h1>",
        f"<p>Latency on {html.escape(str(environment['cpu']))} with {environment['threads']} threads, "
        f"torch {html.escape(str(environment['torch']))}. Trained methods are shaded; the other rows are "
        'baselines scored on the same test split. <span id="status"></span></p>',
    ]
    for section in sections:
        parts.append(f'<section id="{html.escape(section["task"])}"><h2>{html.escape(section["task"])}</h2>')
        parts.append(_table(section["headers"], section["rows"], section["trained"]))
        for caption, image in section["figures"]:
            parts.append(
                f'<figure><img src="{png_data_uri(image)}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
