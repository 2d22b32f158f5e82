"""Safe evaluation of Math23K equations and answers: a recursive-descent parser, never `eval`.

Grammar (whitespace ignored; full-width forms （）＋－×÷％ and the ASCII `**` are read as their usual operators):

    equation := ["x" "="] expr
    expr     := term (("+" | "-") term)*
    term     := unary (("*" | "/") unary)*
    unary    := ("+" | "-") unary | power
    power    := postfix ["^" unary]            (right-associative, binds tighter than unary minus on its left)
    postfix  := atom "%"*                      (each % divides by 100)
    atom     := number ["(" int "/" int ")"]   (a mixed number such as 3(1/2) = 3.5, as Math23K writes them)
              | "(" expr ")"

Numbers are decimal (`12`, `0.5`, `.5`). Anything else (names, calls, other operators) is rejected with
`EquationError`. Exponents are bounded (|exponent| <= MAX_EXPONENT, |result| <= MAX_VALUE) so a hostile string
cannot make the evaluation run for long; division by zero is an EquationError.
"""

from __future__ import annotations

import math
import re

MAX_EXPONENT = 64
MAX_VALUE = 1e100
MAX_CHARS = 1000

_FULLWIDTH = str.maketrans({"（": "(", "）": ")", "＋": "+", "－": "-", "×": "*", "＊": "*", "÷": "/", "／": "/",
                            "％": "%", "＝": "=", "．": ".", "＾": "^", "Ｘ": "x", "ｘ": "x", "X": "x", "−": "-"})
_FULLWIDTH.update({0xFF10 + i: ord("0") + i for i in range(10)})  # full-width digits
_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)|(\*\*|[-+*/^()%=x]))")


class EquationError(ValueError):
    """The text is not an equation or expression this parser accepts, or cannot be evaluated."""


def _tokens(text: str) -> list[tuple[str, str]]:
    text = text.translate(_FULLWIDTH)
    if len(text) > MAX_CHARS:
        raise EquationError(f"expression longer than {MAX_CHARS} characters")
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise EquationError(f"unexpected {text[pos:].lstrip()[:10]!r} at character {pos}")
        num, op = m.groups()
        out.append(("num", num) if num is not None else ("op", "^" if op == "**" else op))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]):
        self.t, self.i = tokens, 0

    def peek(self, k: int = 0) -> tuple[str, str] | None:
        return self.t[self.i + k] if self.i + k < len(self.t) else None

    def take(self, op: str) -> bool:
        if self.peek() == ("op", op):
            self.i += 1
            return True
        return False

    def expect(self, op: str) -> None:
        if not self.take(op):
            got = self.peek()
            raise EquationError(f"expected {op!r}, got {got[1] if got else 'the end'!r}")

    def expr(self) -> float:
        v = self.term()
        while True:
            if self.take("+"):
                v = _check(v + self.term())
            elif self.take("-"):
                v = _check(v - self.term())
            else:
                return v

    def term(self) -> float:
        v = self.unary()
        while True:
            if self.take("*"):
                v = _check(v * self.unary())
            elif self.take("/"):
                d = self.unary()
                if d == 0:
                    raise EquationError("division by zero")
                v = _check(v / d)
            else:
                return v

    def unary(self) -> float:
        if self.take("-"):
            return -self.unary()
        if self.take("+"):
            return self.unary()
        return self.power()

    def power(self) -> float:
        base = self.postfix()
        if self.take("^"):
            exp = self.unary()
            if abs(exp) > MAX_EXPONENT:
                raise EquationError(f"exponent {exp} is larger than {MAX_EXPONENT}")
            if base == 0 and exp < 0:
                raise EquationError("zero to a negative power")
            try:
                r = base ** exp
            except (OverflowError, ZeroDivisionError) as e:
                raise EquationError(str(e)) from None
            if isinstance(r, complex):
                raise EquationError("a negative number to a fractional power")
            return _check(r)
        return base

    def postfix(self) -> float:
        v = self.atom()
        while self.take("%"):
            v = v / 100.0
        return v

    def atom(self) -> float:
        tok = self.peek()
        if tok is None:
            raise EquationError("unexpected end of the expression")
        if tok[0] == "num":
            self.i += 1
            v = float(tok[1])
            # mixed number: an integer directly followed by (int/int), e.g. 3(1/2)
            if (self.peek() == ("op", "(") and self.peek(1) and self.peek(1)[0] == "num"
                    and self.peek(2) == ("op", "/") and self.peek(3) and self.peek(3)[0] == "num"
                    and self.peek(4) == ("op", ")")):
                num, den = float(self.t[self.i + 1][1]), float(self.t[self.i + 3][1])
                if den == 0:
                    raise EquationError("division by zero")
                self.i += 5
                v = v + num / den if v >= 0 else v - num / den
            return v
        if self.take("("):
            v = self.expr()
            self.expect(")")
            return v
        raise EquationError(f"unexpected {tok[1]!r}")


def _check(v: float) -> float:
    if not math.isfinite(v) or abs(v) > MAX_VALUE:
        raise EquationError("value out of range")
    return v


def evaluate_expression(text: str) -> float:
    """The value of an arithmetic expression, or of the right side of an equation `x=...`."""
    tokens = _tokens(text)
    if len(tokens) >= 2 and tokens[0] == ("op", "x") and tokens[1] == ("op", "="):
        tokens = tokens[2:]
    if any(t == ("op", "x") or t == ("op", "=") for t in tokens):
        raise EquationError("only `x=<expression>` or an expression is accepted")
    if not tokens:
        raise EquationError("empty expression")
    p = _Parser(tokens)
    try:
        v = p.expr()
    except RecursionError:  # the parser recurses once per parenthesis level
        raise EquationError("expression nested too deeply") from None
    if p.i != len(tokens):
        raise EquationError(f"unexpected {tokens[p.i][1]!r} after the expression")
    return v


def try_evaluate(text: str | None) -> float | None:
    """evaluate_expression, or None when the text is not a valid expression (generated text often is not)."""
    if text is None:
        return None
    try:
        return evaluate_expression(text)
    except EquationError:
        return None
