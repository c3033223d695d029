"""A report as a list of blocks, rendered to Markdown and to one self-contained HTML file.

Reports are built once as data — :class:`Heading`, :class:`Paragraph`, :class:`Bullets`, :class:`Table`,
:class:`Figure` — and both renderers walk the same list, so ``report.md`` and ``report.html`` can never say
different things. Text is plain text: the Markdown renderer escapes Markdown's specials, the HTML renderer
escapes with :func:`html.escape`.

The HTML file stands alone: CSS inline in ``<style>``, figures as ``data:image/png;base64,…`` URIs, no scripts
and no external URL (it opens offline, from an e-mail attachment, or in a sandboxed viewer). The Markdown
file links its figures as PNG files written next to it.

Example::

    blocks = [Heading(1, "Report"), Paragraph("2 runs."), Table(("model", "ppl"), [("a", "3.100")])]
    to_markdown(blocks, {})      # '# Report\\n\\n2 runs.\\n\\n| model | ppl |\\n|---|---|\\n| a | 3.100 |\\n'
    to_html(blocks, "Report")    # '<!doctype html>…<table>…<td class="num">3.100</td>…'
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass

_NUM = r"[+\-−]?(?:[\d.,]+(?:e[+\-]?\d+)?|nan|inf)"
# a number, "mean ± half", a percentage or an interval "[low, high]": right-aligned, never wrapped
NUMERIC = re.compile(rf"^(?:{_NUM}(?:\s*±\s*{_NUM})?%?|\[{_NUM}, {_NUM}\])$")


@dataclass(frozen=True)
class Heading:
    level: int  # 1 = document title, 2 = section, 3 = subsection
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]
    callout: bool = False  # True: rendered as a highlighted warning box (Markdown: a block quote)


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]  # already formatted cells; every row has len(header) cells


@dataclass(frozen=True)
class Figure:
    name: str  # file name of the PNG next to report.md, e.g. "baseline_perplexity.png"
    png: bytes
    caption: str


Block = Heading | Paragraph | Bullets | Table | Figure

# ---------------------------------------------------------------------------------------------- Markdown
# Markup characters; "_" only at a word edge (CommonMark ignores intraword "_", so random_k stays readable)
_MD_SPECIAL = re.compile(r"[\\`*<>\[\]|]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")


def md_escape(text: str) -> str:
    """Backslash-escape the characters Markdown would read as markup (``|`` too: cells live in tables)."""
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), text)


def _md_table(t: Table) -> list[str]:
    lines = ["| " + " | ".join(md_escape(h) for h in t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in t.rows]
    return lines


def _md_block(b: Block, figure_paths: dict[str, str]) -> list[str]:
    if isinstance(b, Heading):
        return ["#" * b.level + " " + md_escape(b.text)]
    if isinstance(b, Paragraph):
        return [md_escape(b.text)]
    if isinstance(b, Bullets):
        prefix = "> - " if b.callout else "- "
        return [prefix + md_escape(item) for item in b.items]
    if isinstance(b, Table):
        return _md_table(b)
    if isinstance(b, Figure):
        return [f"![{md_escape(b.caption)}]({figure_paths.get(b.name, b.name)})"]
    raise TypeError(f"not a report block: {b!r}")


def to_markdown(blocks: list[Block], figure_paths: dict[str, str]) -> str:
    """Markdown text; figures link to ``figure_paths[name]`` (relative paths; default: the name)."""
    return "\n\n".join("\n".join(_md_block(b, figure_paths)) for b in blocks) + "\n"


# ------------------------------------------------------------------------------------------------- HTML
CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2125; background: #fff;
       margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; border-bottom: 2px solid #2b6cb0; padding-bottom: 6px; }
h2 { font-size: 20px; margin-top: 32px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
h3 { font-size: 16px; margin-top: 20px; }
table { border-collapse: collapse; margin: 12px 0; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.callout { border-left: 4px solid #d97706; background: #fff7e6; padding: 6px 16px; margin: 12px 0; }
.callout li { margin: 4px 0; }
figure { margin: 16px 0; }
figure img { max-width: 100%; border: 1px solid #e5e7eb; }
figcaption { font-size: 13px; color: #57606a; }
"""


def _cell(tag: str, text: str) -> str:
    cls = ' class="num"' if tag == "td" and NUMERIC.match(text.strip()) else ""
    return f"<{tag}{cls}>{html.escape(text)}</{tag}>"


def _html_table(t: Table) -> str:
    head = "<tr>" + "".join(_cell("th", h) for h in t.header) + "</tr>"
    body = "\n".join("<tr>" + "".join(_cell("td", c) for c in row) + "</tr>" for row in t.rows)
    return f"<table>\n<thead>{head}</thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _html_block(b: Block) -> str:
    if isinstance(b, Heading):
        return f"<h{b.level}>{html.escape(b.text)}</h{b.level}>"
    if isinstance(b, Paragraph):
        return f"<p>{html.escape(b.text)}</p>"
    if isinstance(b, Bullets):
        items = "\n".join(f"<li>{html.escape(i)}</li>" for i in b.items)
        ul = f"<ul>\n{items}\n</ul>"
        return f'<section class="callout">{ul}</section>' if b.callout else ul
    if isinstance(b, Table):
        return _html_table(b)
    if isinstance(b, Figure):
        data = base64.b64encode(b.png).decode("ascii")
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.caption, quote=True)}">'
                f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
    raise TypeError(f"not a report block: {b!r}")


def to_html(blocks: list[Block], title: str) -> str:
    """One self-contained HTML5 document: inline CSS, base64 PNG figures, no scripts, no external URLs."""
    body = "\n".join(_html_block(b) for b in blocks)
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}\n"
            f"</main>\n</body>\n</html>\n")
