"""Reading CUGE raw files row by row, with each row's line: JSONL, JSON lists, JSON values one after another.
A row that cannot be decoded becomes a `Malformed` value (counted by the loader), never an exception, except in a
JSON list whose syntax is broken (no row boundary can be found after it)."""

from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import CpmantError


class Malformed(ValueError):
    """A raw row that does not fit the task's format (counted, not fatal unless over the threshold)."""


@dataclass(frozen=True)
class Row:
    path: Path
    line: int
    value: Any  # the decoded JSON value, or a Malformed when the row could not be decoded


def _line_index(text: str) -> list[int]:
    return [i for i, c in enumerate(text) if c == "\n"]


def _line_of(newlines: list[int], offset: int) -> int:
    return bisect_right(newlines, offset - 1) + 1


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise CpmantError(f"task file {path} is not UTF-8 (byte {e.start})",
                          f"convert it, e.g. `iconv -f GB18030 -t UTF-8 {path} > {path}.utf8`") from None


def read_jsonl(path: Path) -> Iterator[Row]:
    """One JSON value per line; blank lines skipped; a line that is not JSON is a Malformed row."""
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            value = Malformed(f"not JSON ({e.msg} at column {e.colno})")
        except RecursionError:  # json's decoder recurses once per nesting level
            value = Malformed("JSON nested too deeply")
        yield Row(path, lineno, value)


def read_json_values(path: Path) -> Iterator[Row]:
    """A JSON list (each element one row, with its line), or JSON values one after another (Math23K's own file
    is objects one after another; JSONL is a special case). A broken value in a sequence is a Malformed row and
    reading resumes at the next line that starts with `{` or `[`; a broken list is fatal (no row boundary)."""
    text = _read_text(path)
    nl = _line_index(text)
    dec = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i >= len(text):
        return
    if text[i] == "[":  # a list: iterate its elements with their offsets
        i = _skip_ws(text, i + 1)
        if i < len(text) and text[i] == "]":
            return
        while True:
            try:
                value, end = dec.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise CpmantError(f"{path}:{_line_of(nl, e.pos)}: broken JSON list ({e.msg}); no row after it "
                                  "can be read", "fix the JSON syntax there (or write the file as JSONL)") from None
            except RecursionError:  # json's decoder recurses once per nesting level
                raise CpmantError(f"{path}:{_line_of(nl, i)}: a JSON value nested too deeply to read",
                                  "remove that row (or write the file as JSONL: a bad line is then skipped)") from None
            yield Row(path, _line_of(nl, i), value)
            j = _skip_ws(text, end)
            if j < len(text) and text[j] == ",":
                i = _skip_ws(text, j + 1)
                continue
            if j < len(text) and text[j] == "]":
                if _skip_ws(text, j + 1) < len(text):
                    raise CpmantError(f"{path}:{_line_of(nl, j + 1)}: text after the end of the JSON list",
                                      "remove it")
                return
            raise CpmantError(f"{path}:{_line_of(nl, j)}: expected `,` or `]` in the JSON list",
                              "fix the JSON syntax there")
    while i < len(text):
        try:
            value, end = dec.raw_decode(text, i)
            yield Row(path, _line_of(nl, i), value)
            i = _skip_ws(text, end)
        except (json.JSONDecodeError, RecursionError) as e:
            why = (f"not JSON ({e.msg} at line {_line_of(nl, e.pos)})" if isinstance(e, json.JSONDecodeError)
                   else "JSON nested too deeply")
            yield Row(path, _line_of(nl, i), Malformed(why))
            nxt = [p for p in (text.find("\n{", i + 1), text.find("\n[", i + 1)) if p >= 0]
            if not nxt:
                return
            i = min(nxt) + 1
