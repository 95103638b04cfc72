"""A stand-in for ``func.Out[...]`` in tests that call the functions directly."""

from __future__ import annotations

from typing import Any


class Out:
    """Records every ``set()``: a function must set an output once or not at all."""

    def __init__(self) -> None:
        self.sets: list[Any] = []

    def set(self, value: Any) -> None:
        self.sets.append(value)

    def get(self) -> Any:
        return self.value

    @property
    def value(self) -> Any:
        return self.sets[-1] if self.sets else None

    @property
    def was_set(self) -> bool:
        return bool(self.sets)
