"""Reading a spectra HTML page back as a browser would (the standard library's HTMLParser, never spectra's own
code): its tags, the cells of its rows table, its title, and the embedded PNGs decoded to images."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

PNG = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Every start tag with its attributes; the text of each <th>/<td> of the table with id ``rows-table``
    (row by row) and of the <title>."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.title = ""
        self.head: list[str] = []
        self.rows: list[list[str]] = []
        self._in: list[str] = []
        self._cell: list[str] | None = None
        self._table_depth = 0
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        self._in.append(tag)
        if tag == "table":
            self._table_depth += 1 if (a.get("id") == "rows-table" or self._table_depth) else 0
        if self._table_depth == 1:
            if tag == "tr" and "thead" not in self._in:
                self.rows.append([])
            if tag in ("th", "td"):
                self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("th", "td") and self._cell is not None and self._table_depth == 1:
            text = "".join(self._cell)
            (self.head if "thead" in self._in else self.rows[-1]).append(text)
            self._cell = None
        if tag == "table" and self._table_depth:
            self._table_depth -= 1
        while self._in:
            if self._in.pop() == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in and self._in[-1] == "title":
            self.title += data

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag]


def png_size(src: str) -> tuple[int, int]:
    assert src.startswith("data:image/png;base64,"), src[:40]
    data = base64.b64decode(src.split(",", 1)[1], validate=True)
    assert data[:8] == PNG
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.size


def assert_self_contained(page: str) -> None:
    doc = Page(page)
    for tag, attrs in doc.tags:
        for key in ("src", "href", "action", "srcset", "poster", "data", "background", "formaction"):
            value = attrs.get(key)
            if value is not None:
                assert value.startswith(("data:image/png;base64,", "#")), (tag, key, value[:60])
    assert not doc.all("link") and not doc.all("iframe") and not doc.all("object") and not doc.all("embed")
    assert all("src" not in a for a in doc.all("script"))
    no_data = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"(?i)\b(https?|ftp|wss?):|//[a-z0-9.-]+\.[a-z]{2,}|@import|url\(", no_data)
    csp = [a for a in doc.all("meta") if a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in (csp[0]["content"] or "")
