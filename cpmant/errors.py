"""One exception type for bad input: its message names the problem and the fix."""


class CpmantError(Exception):
    """Raised for bad input or a bad environment; the message says what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


def a_or_an(word: str) -> str:
    """`word` with its indefinite article, for messages: "an adapter delta", "a lora delta", "an int"."""
    return f"{'an' if str(word)[:1].lower() in 'aeio' else 'a'} {word}"
