"""A run's description (the `mlflow.note.content` tag) in the markdown MLflow's run page renders well.

    mlflow_note(md) -> str

MLflow renders a run description with showdown and a sanitiser that keeps no `style` attribute, inside a panel
whose heading styles are tight: a `#` heading there overlaps the list below it, and a markdown table has no cell
padding (neither can be fixed from the text). So the description says the same as the full markdown report (logged
beside it as an artifact, and in Prefect, which render both well) with headings as bold lines and each table row as
a list item, "**first cell**: column value; column value".
"""

from __future__ import annotations

import re

_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")


def _cells(line: str) -> list[str]:
    """A markdown table row's cells (escaped pipes `\\|` kept inside a cell)."""
    inner = line.strip().removeprefix("|").removesuffix("|")
    return [c.replace("\\|", "|").strip() for c in re.split(r"(?<!\\)\|", inner)]


def _table_items(head: list[str], rows: list[list[str]]) -> list[str]:
    out = []
    for r in rows:
        rest = "; ".join(f"{h} {c}" for h, c in zip(head[1:], r[1:]) if c)
        out.append(f"- **{r[0] if r else ''}**" + (f": {rest}" if rest else ""))
    return out


def mlflow_note(md: str) -> str:
    """`md` with `#` headings as bold lines (a blank line after each) and tables as lists."""
    lines, out, i = md.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        h = _HEADING.match(line)
        if h:
            out += [f"**{h.group(2).strip()}**", ""]
            i += 1
            while i < len(lines) and not lines[i].strip():  # one blank line after a heading
                i += 1
            continue
        if line.lstrip().startswith("|") and i + 1 < len(lines) and _RULE.match(lines[i + 1].strip()):
            head, rows, i = _cells(line), [], i + 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            out += _table_items(head, rows)
            continue
        out.append(line)
        i += 1
    return "\n".join(out).strip() + "\n"
