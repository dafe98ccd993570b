"""Named registries: ``@ADVANTAGES.register("rloo")`` adds a function; a failed lookup lists the valid names."""

from __future__ import annotations

from collections.abc import Callable

from dgg.errors import UserError


class Registry:
    def __init__(self, kind: str, field: str):
        self.kind, self.field = kind, field  # e.g. "advantage estimator", "algo.advantage"
        self._entries: dict[str, Callable] = {}

    def register(self, name: str):
        def add(function: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = function
            return function
        return add

    def __getitem__(self, name: str) -> Callable:
        if name not in self._entries:
            raise UserError(f"{self.field}: unknown {self.kind} {name!r}; valid: {', '.join(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)
