"""The page's building blocks: its CSS, escaping, one number format, tables, inline images and sections."""

from __future__ import annotations

import html

from .scores import fmt

NOT_RUN = "not run yet"
CSS = """
body{font-family:"Noto Sans CJK SC","Noto Sans",system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;
line-height:1.45;padding:0 1em}
h1{font-size:1.6em;border-bottom:2px solid #4c72b0;padding-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;
color:#2b4a80}table{border-collapse:collapse;margin:.6em 0;font-size:.85em}th,td{border:1px solid #ccc;
padding:.25em .5em;text-align:right}th{background:#eef2f8}td.l,th.l{text-align:left}
.note{color:#555;font-size:.9em}.missing{color:#a33;font-style:italic}img{max-width:100%}
.pub{background:#fff4e6}code{background:#f3f3f3;padding:0 .2em}
.warn{color:#a33;background:#fdecea;border-left:4px solid #a33;padding:.3em .6em}
details.vrun,details.vfail{border:1px solid #ddd;border-radius:4px;margin:.3em 0;padding:0 .6em}
details.vfail{border:2px solid #a33;background:#fffafa}summary h3{display:inline;font-size:1em;margin:.3em 0}
.fail{color:#fff;background:#a33;padding:0 .4em;border-radius:3px}.ok{color:#fff;background:#2e7d32;padding:0 .4em;
border-radius:3px}
.demo{background:#fff4e6;color:#8a4b00;font-size:.8em;padding:0 .4em;border:1px solid #e0b070;border-radius:3px}
"""


def esc(v) -> str:
    return html.escape(str(v))


def missing(what: str) -> str:
    """The line a section shows while its stage has not run."""
    return f'<p class="missing">{what}</p>'


def _cell(v, pub: bool) -> str:
    cls = "pub" if pub else ("l" if isinstance(v, (str, list, tuple)) or v is None else "")
    text = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else fmt(v)  # aliases: MLflow's way
    return f'<td class="{cls}">{esc(text)}</td>'


def table(rows: list[dict], cols: list[str] | None = None, labels: dict | None = None,
          pub_cols: tuple = ()) -> str:
    """An HTML table of `rows` (columns `cols`, headed by `labels`; published columns shaded)."""
    if not rows:
        return missing(NOT_RUN)
    cols = cols or list(rows[0])
    labels = labels or {}
    head = "".join(f'<th class="{"pub" if c in pub_cols else "l"}">{esc(labels.get(c, c))}</th>' for c in cols)
    body = "".join("<tr>" + "".join(_cell(r.get(c), c in pub_cols) for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img(b64: str | None, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{b64}">' if b64 else ""


def section(title: str, anchor: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title, quote=False)}</h2>{body}</section>'
