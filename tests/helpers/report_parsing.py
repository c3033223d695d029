"""Reading the study report back: Markdown tables and the HTML page's tables, images and links."""

from __future__ import annotations

import re
from html.parser import HTMLParser


def md_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table as rows of unescaped cells (header first, separator dropped)."""
    tables, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            cells = [re.sub(r"\\(.)", r"\1", c.strip()) for c in cells]
            if not all(set(c) <= {"-"} for c in cells):
                cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    return tables


class HtmlParts(HTMLParser):
    """Tables (rows of cell texts, header row included), ``<img>`` sources and every src/href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables, self.imgs, self.links, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.imgs.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if key in attrs:
                self.links.append(attrs[key])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None


def html_parts(text: str) -> HtmlParts:
    parser = HtmlParts()
    parser.feed(text)
    return parser
