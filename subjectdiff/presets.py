"""Named presets: one registry per kind of config, the preset functions themselves the only list of names.

    PRESETS = Presets("training", tiny, sd2_base, paper)    # names from the functions: tiny, sd2-base, paper
    cfg = PRESETS["paper"]()                                # an unknown name: "unknown training preset 'x'; ..."

Each app keeps its presets as plain functions next to its config (`def tiny() -> TrainConfig`) and lists them
once, here; `--preset NAME` on every command looks its name up through this. An old name stays for one release
as a deprecated alias (one notice on stderr, subjectdiff.cli_words).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from subjectdiff.cli_words import deprecated


class UnknownPreset(KeyError, ValueError):
    """A preset name no registry holds: a ValueError to the commands (one line), a KeyError to a mapping."""

    def __str__(self) -> str:
        return str(self.args[0])


class Presets(Mapping[str, Callable[[], Any]]):
    """Preset functions by name (the function's name with `-` for `_`: `sd2_base` -> `sd2-base`), in the order
    given; `aliases` maps deprecated names to current ones."""

    def __init__(self, kind: str, *functions: Callable[[], Any], aliases: dict[str, str] | None = None):
        self.kind = kind
        self._functions = {f.__name__.replace("_", "-"): f for f in functions}
        self._aliases = dict(aliases or {})
        for old, new in self._aliases.items():
            assert new in self._functions, f"alias {old!r} of an unknown {kind} preset {new!r}"

    def __getitem__(self, name: str) -> Callable[[], Any]:
        if name in self._aliases:
            deprecated(f"preset {name!r}", repr(self._aliases[name]))
            name = self._aliases[name]
        if name not in self._functions:
            raise UnknownPreset(f"unknown {self.kind} preset {name!r}; presets: {', '.join(self._functions)}")
        return self._functions[name]

    def __contains__(self, name: object) -> bool:
        return name in self._functions or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._functions)  # aliases are not offered (help, choices)

    def __len__(self) -> int:
        return len(self._functions)

    def names(self) -> str:
        """The names for a help text: 'tiny, sd2-base, paper'."""
        return ", ".join(self._functions)
