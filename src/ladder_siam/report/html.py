"""The report as a small document model, rendered to self-contained HTML and to Markdown.

Sections are built once (paragraphs, tables, PNG figures) and rendered twice, so the two
formats cannot drift apart. The HTML embeds every image as a base64 ``data:`` URI and its
CSS inline: it opens from a KFP artifact, an S3 console or an e-mail without any request.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field

NOT_RUN = "not run"

_CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { border-bottom: 2px solid #345; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #eef2f6; }
td.not-run { color: #a33; font-style: italic; text-align: center; }
caption { caption-side: top; text-align: left; font-weight: bold; padding: 0.3em 0; }
div.figures { display: flex; flex-wrap: wrap; gap: 0.5em; align-items: flex-start; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
p.note { color: #555; }
nav li { display: inline; margin-right: 1em; }
"""


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of plain text; ``note`` paragraphs are caveats and "not run" notices."""

    text: str
    note: bool = False


@dataclass(frozen=True)
class Table:
    """A table of pre-formatted cells; cells equal to :data:`NOT_RUN` are highlighted."""

    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    """A PNG figure, written beside ``report.md`` as ``filename``."""

    filename: str
    png: bytes
    alt: str


Block = Paragraph | Table | Figure


@dataclass
class Section:
    """One numbered part of the report."""

    title: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        """The section's HTML id, derived from its title."""
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_NUMBER = re.compile(r"^[+-]?\.?\d")


def _html_cell(cell: str) -> str:
    if cell == NOT_RUN:
        return f'<td class="not-run">{NOT_RUN}</td>'
    css = ' class="num"' if _NUMBER.match(cell) else ""
    return f"<td{css}>{html.escape(cell)}</td>"


def _html_table(table: Table) -> str:
    parts = ["<table>"]
    if table.caption:
        parts.append(f"<caption>{html.escape(table.caption)}</caption>")
    parts.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in table.header) + "</tr>")
    parts.extend("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in table.rows)
    parts.append("</table>")
    return "\n".join(parts)


def _html_blocks(blocks: list[Block]) -> list[str]:
    """Paragraphs and tables in order; each run of figures wrapped in one flowing row."""
    parts: list[str] = []
    row: list[str] = []
    for block in [*blocks, None]:
        if isinstance(block, Figure):
            row.append(f'<img src="{data_uri(block.png)}" alt="{html.escape(block.alt)}">')
            continue
        if row:
            parts.append('<div class="figures">' + "".join(row) + "</div>")
            row = []
        if isinstance(block, Paragraph):
            css = ' class="note"' if block.note else ""
            parts.append(f"<p{css}>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            parts.append(_html_table(block))
    return parts


def render_html(title: str, sections: list[Section]) -> str:
    """The report as one self-contained HTML page (inline CSS, images as data URIs)."""
    toc = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in sections)
    body = [f"<h1>{html.escape(title)}</h1>", f"<nav><ul>{toc}</ul></nav>"]
    for section in sections:
        body.append(f'<h2 id="{section.anchor}">{html.escape(section.title)}</h2>')
        body.extend(_html_blocks(section.blocks))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _markdown_cell(text: str) -> str:
    return f"*{NOT_RUN}*" if text == NOT_RUN else text.replace("|", r"\|")


def _markdown_table(table: Table) -> str:
    lines = [f"**{table.caption}**", ""] if table.caption else []
    lines.append("| " + " | ".join(_markdown_cell(h) for h in table.header) + " |")
    lines.append("|" + "|".join(["---"] * len(table.header)) + "|")
    lines.extend("| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in table.rows)
    return "\n".join(lines)


def render_markdown(
    title: str, sections: list[Section], image_link: Callable[[Figure], str] | None = None
) -> str:
    """The report as Markdown.

    Args:
        title: The top heading.
        sections: The report's sections.
        image_link: Maps a figure to its link target; default: its file name, relative to
            the Markdown file. Pass :func:`figure_data_uri` for a single-file document.
    """
    link = image_link or (lambda figure: figure.filename)
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Paragraph):
                lines.append(f"*{block.text}*" if block.note else block.text)
            elif isinstance(block, Table):
                lines.append(_markdown_table(block))
            else:
                lines.append(f"![{block.alt}]({link(block)})")
            lines.append("")
    return "\n".join(lines)


def figure_data_uri(figure: Figure) -> str:
    """A figure's PNG as a ``data:`` URI (for :func:`render_markdown`'s ``image_link``)."""
    return data_uri(figure.png)


def figures(sections: list[Section]) -> list[Figure]:
    """Every figure of the report, in order."""
    return [block for section in sections for block in section.blocks if isinstance(block, Figure)]
