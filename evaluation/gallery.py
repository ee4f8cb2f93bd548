"""The A/B gallery: one HTML page with, per prompt, every arm's 360-degree video side by side, its numbers under it, and
the report's plots at the end.

The page is self-contained: inline CSS and a few lines of inline script, no CDN, every link relative to the page, so it
works opened as a file (file://) and from any static server whose root holds both the page and the runs
(`python -m http.server` in the batch folder, or in the folder above the runs for an `evaluate.py --ab` report).
Videos are train.py's H.264 mp4s (yuv420p), which Chromium, Chrome, Firefox and Safari play. Every text is escaped.

`gallery_html` is pure (rows in, HTML out); the reports build the rows and write the page.
"""
from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

GALLERY_FILE = "gallery.html"


@dataclass(frozen=True)
class GalleryCell:
    """One arm of one row."""
    video: str | None = None                                   # href relative to the page; None: no video
    numbers: tuple[tuple[str, str], ...] = ()                  # (name, formatted value), shown under the video
    note: str = ""                                             # e.g. the error of a failed job
    failed: bool = False                                       # shows the note as a failure


@dataclass(frozen=True)
class GalleryRow:
    prompt: str
    detail: str = ""                                           # e.g. "seed 0"
    cells: dict[str, GalleryCell] = field(default_factory=dict)  # arm -> cell; a missing arm shows "no job"


def final_video(run: str | os.PathLike) -> Path | None:
    """The run's RGB 360-degree video of its highest iteration, where train.py's save_video writes it
    (<run>/videos/<N>_iteration/video_rgb_<N>.mp4); None when it wrote none (save_video=false)."""
    found = []
    for path in Path(run).glob("videos/*_iteration/video_rgb_*.mp4"):
        match = re.fullmatch(r"(\d+)_iteration/video_rgb_(\d+)\.mp4", f"{path.parent.name}/{path.name}")
        if match and match.group(1) == match.group(2) and path.stat().st_size > 0:
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def href(target: str | os.PathLike, page_folder: str | os.PathLike) -> str:
    """`target` as a URL relative to a page in `page_folder`, each path segment percent-encoded (a folder named
    'bagel #2' must not turn into a fragment)."""
    relative = os.path.relpath(os.path.abspath(target), os.path.abspath(page_folder))
    return "/".join(quote(part) for part in Path(relative).parts)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.4em; margin-bottom: .2em; }
p.note { margin: .2em 0; color: #555; }
table { border-collapse: collapse; margin-top: 1em; }
th, td { border: 1px solid #ccc; padding: 6px; vertical-align: top; }
th { background: #f3f3f3; }
td.prompt { max-width: 16em; }
td.prompt .detail, .small { color: #666; font-size: 85%; }
video { display: block; width: 320px; max-width: 100%; background: #000; }
.missing { width: 320px; height: 4em; display: flex; align-items: center; justify-content: center;
           background: #eee; color: #666; }
dl { display: grid; grid-template-columns: auto auto; gap: 0 .8em; margin: .4em 0 0; font-size: 90%; }
dt { color: #555; } dd { margin: 0; font-variant-numeric: tabular-nums; }
.failed { color: #b00020; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
"""

# Plays the videos of the rows in view (a row's arms restart together, so they stay in step) and pauses the others.
# A benchmark page holds hundreds of videos: they are not preloaded (preload="none"), so a row's videos load when it
# comes into view, not all at once (a plain static server answers no range requests: preloading would fetch every
# file whole). Without script the controls still play each one.
_SCRIPT = """
(function () {
  if (!("IntersectionObserver" in window)) return;
  var seen = new IntersectionObserver(function (entries) {
    entries.forEach(function (entry) {
      entry.target.querySelectorAll("video").forEach(function (video) {
        if (entry.isIntersecting) { video.currentTime = 0; video.play().catch(function () {}); }
        else { video.pause(); }
      });
    });
  });
  document.querySelectorAll("tr.prompt-row").forEach(function (row) { seen.observe(row); });
})();
"""


def _cell_html(cell: GalleryCell | None) -> str:
    e = html.escape
    if cell is None:
        return '<td><div class="missing">no job</div></td>'
    if cell.video:
        video = (f'<video src="{e(cell.video)}" muted loop playsinline controls preload="none">'
                 f'<a href="{e(cell.video)}">video</a></video>'
                 f'<a class="small" href="{e(cell.video)}">open video</a>')
    else:
        video = '<div class="missing">no video</div>'
    numbers = "".join(f"<dt>{e(name)}</dt><dd>{e(value)}</dd>" for name, value in cell.numbers)
    note = f'<p class="{"failed" if cell.failed else "small"}">{e(cell.note)}</p>' if cell.note else ""
    return f"<td>{video}{f'<dl>{numbers}</dl>' if numbers else ''}{note}</td>"


def gallery_html(title: str, arms: list[str], rows: list[GalleryRow], plots: list[str] = (),
                 notes: list[str] = (), links: list[tuple[str, str]] = ()) -> str:
    """The gallery page.

    Args:
        arms: the columns, in order (e.g. ["vanilla", "ptd"]).
        rows: one per prompt (and seed), in display order.
        plots: hrefs of PNG figures shown after the table.
        notes: lines of plain text under the title.
        links: (text, href) of the report's other files, e.g. ("results.md", "results.md").
    """
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{e(title)}</title>",
             '<link rel="icon" href="data:,">',  # no favicon request: a static server would answer 404
             f"<style>{_STYLE}</style>", "</head>", "<body>", f"<h1>{e(title)}</h1>"]
    parts += [f'<p class="note">{e(line)}</p>' for line in notes]
    if links:
        parts.append('<p class="note">' + " · ".join(f'<a href="{e(url)}">{e(text)}</a>' for text, url in links)
                     + "</p>")
    parts += ["<table>", "<thead><tr><th>prompt</th>" + "".join(f"<th>{e(arm)}</th>" for arm in arms) +
              "</tr></thead>", "<tbody>"]
    for row in rows:
        detail = f'<br><span class="detail">{e(row.detail)}</span>' if row.detail else ""
        parts.append(f'<tr class="prompt-row"><td class="prompt">{e(row.prompt) or "(empty prompt)"}{detail}</td>' +
                     "".join(_cell_html(row.cells.get(arm)) for arm in arms) + "</tr>")
    parts += ["</tbody>", "</table>"]
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f'<figure><img src="{e(url)}" alt="{e(url)}"><figcaption class="small">{e(url)}</figcaption>'
                  f"</figure>" for url in plots]
    parts += [f"<script>{_SCRIPT}</script>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"
