"""One explicit registry per plug-in kind (models, datasets, projection families, optimizers).

A plug-in is one file and one ``register`` call; an unknown name lists the known ones.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Generic, List, Sequence, TypeVar

from raysub.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories.

    Args:
        kind: What the registry holds ("model", "dataset", ...); used in error messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@MODELS.register("lenet5")``. Raises ValueError on a duplicate name."""

        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """The entry registered as ``name``.

        Raises:
            ConfigError: unknown name; the message lists the known ones.
        """
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} {name!r}: choose one of {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def check_options(self, name: str, kwargs: Dict, skip: int, internal: Sequence[str] = ()) -> None:
        """Raise ConfigError naming keyword options the factory ``name`` does not take.

        Args:
            skip: leading positional parameters of the factory that are not options.
            internal: keyword parameters raysub itself passes (not user options).
        """
        params = list(inspect.signature(self.get(name)).parameters.values())[skip:]
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return
        known = [p.name for p in params if p.name not in internal]
        unknown = sorted(set(kwargs) - set(known)) + sorted(set(kwargs) & set(internal))
        if unknown:
            options = f"its options are {', '.join(known)}" if known else "it takes no options"
            raise ConfigError(
                f"{self.kind} {name!r} got unexpected option(s) {', '.join(repr(u) for u in unknown)}: {options}"
            )

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
