"""Config errors that name the key path, the value and what is allowed."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config."""

    path: str  # dotted key path, e.g. "quant.weight.bit"
    message: str  # what is wrong and what is allowed
    value: Any = None
    has_value: bool = True

    def __str__(self) -> str:
        shown = f" = {self.value!r}" if self.has_value else ""
        return f"{self.path}{shown}: {self.message}"


class ConfigError(ValueError):
    """Raised with every problem found in a config, not just the first."""

    def __init__(self, problems: Iterable[Problem], source: str = "config") -> None:
        self.problems = list(problems)
        self.source = source
        lines = [f"{source}: {len(self.problems)} problem(s):"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""
