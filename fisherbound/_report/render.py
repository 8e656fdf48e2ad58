"""Writing the report folder: report.json, the figures, report.md and index.html.

The numbers become plain JSON (``jsonable``: NaN and infinities as null); the
sections (``build_sections``) are written twice, as Markdown and as a standalone HTML
page with inline CSS.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from fisherbound._report.figures import draw_figures
from fisherbound._report.sections import Section, build_sections
from fisherbound._report.settings import Analysis


def jsonable(obj: Any) -> Any:
    """Plain JSON values: floats (NaN and infinities as null), ints, lists, dicts."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def markdown_page(title: str, sections: list[Section]) -> str:
    """The sections as a Markdown document."""
    lines = [f"# {title}", ""]
    for name, blocks in sections:
        lines += [f"## {name}", ""]
        for kind, item in blocks:
            if kind == "p":
                lines += [item, ""]
            elif kind == "meaning":
                lines += [f"> **What this means.** {item}", ""]
            elif kind == "table":
                header, rows = item
                lines.append("| " + " | ".join(h or " " for h in header) + " |")
                lines.append("|" + " --- |" * len(header))
                for row in rows:
                    cells = [c.replace("|", "\\|") for c in row]
                    lines.append("| " + " | ".join(cells) + " |")
                lines.append("")
            else:
                lines += [f"![{item['title']}]({item['file']})", "", f"*{item['caption']}*", ""]
    return "\n".join(lines)


CSS = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.55rem; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figure img { height: auto; }
figcaption { font-size: 0.85rem; color: #555; }
p.meaning { background: #f4f8fb; border-left: 4px solid #4a7fb0; padding: 0.5rem 0.8rem; }
code { font-size: 0.85rem; }
"""


def html_page(title: str, sections: list[Section]) -> str:
    """The sections as a standalone HTML page."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{e(title)}</h1>",
    ]
    for name, blocks in sections:
        parts.append(f"<h2>{e(name)}</h2>")
        for kind, item in blocks:
            if kind == "p":
                parts.append(f"<p>{e(item)}</p>")
            elif kind == "meaning":
                parts.append(f'<p class="meaning"><strong>What this means.</strong> {e(item)}</p>')
            elif kind == "table":
                header, rows = item
                parts.append("<table>")
                if any(header):
                    parts.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
                for row in rows:
                    cells = "".join(f"<td>{inline_code(e(c))}</td>" for c in row)
                    parts.append(f"<tr>{cells}</tr>")
                parts.append("</table>")
            else:
                parts.append(
                    f'<figure><img src="{e(item["file"])}" alt="{e(item["title"])}"'
                    f"{img_size(item)}><figcaption>{e(item['caption'])}</figcaption></figure>"
                )
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


#: CSS pixels per inch of figure in index.html.
CSS_PER_INCH = 100.0


def img_size(figure: dict[str, Any]) -> str:
    """``width`` and ``height`` attributes: a figure's PNG at ``CSS_PER_INCH`` pixels per inch.

    The PNGs have ``dpi`` (160) pixels per inch of figure, more than they are shown
    at, so that they stay sharp on a high-density screen (and when zoomed).
    """
    if "width" not in figure or "dpi" not in figure:
        return ""
    shrink = CSS_PER_INCH / float(figure["dpi"])
    width, height = round(figure["width"] * shrink), round(figure["height"] * shrink)
    return f' width="{width}" height="{height}"'


def inline_code(text: str) -> str:
    """A table cell written as `code` in Markdown becomes <code> in HTML."""
    if text.startswith("`") and text.endswith("`") and len(text) > 1:
        return f"<code>{text[1:-1]}</code>"
    return text


def write_report(analysis: Analysis, out: str | Path, *, title: str | None = None) -> Path:
    """Write ``report.json``, the PNG figures, ``report.md`` and ``index.html`` into ``out``.

    The folder is created if needed; files of the same names are replaced, other
    files are left alone. Returns the path of ``index.html``. Needs matplotlib.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(analysis, folder)
    numbers = dict(analysis.numbers)
    numbers["figures"] = figures
    heading = title or numbers.get("title") or "fisherbound report"
    numbers["title"] = heading
    text = json.dumps(jsonable(numbers), indent=1, allow_nan=False)
    (folder / "report.json").write_text(text + "\n", encoding="utf-8")
    parts = build_sections(numbers, figures)
    (folder / "report.md").write_text(markdown_page(heading, parts), encoding="utf-8")
    index = folder / "index.html"
    index.write_text(html_page(heading, parts), encoding="utf-8")
    return index
