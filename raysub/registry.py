"""One explicit registry per plug-in kind (models, datasets, projection families, optimizers).

A plug-in is one file and one ``register`` call, which may also declare what the plug-in is (metadata such as
``random=True`` for a projection family); an unknown name lists the known ones, and a plug-in's user options
are checked against its factory's signature — unknown names and wrong types — before anything starts.
"""
from __future__ import annotations

import inspect
import math
import typing
from typing import Any, Callable, Dict, Generic, List, Sequence, TypeVar

from raysub.errors import ConfigError


def _short(value, quote: bool = True) -> str:
    """``repr(value)`` (``value`` itself when not ``quote``) cut to 80 characters for a one-line message."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= 80 else text[:79] + "…"


T = TypeVar("T")


def type_problem(value: Any, tp: Any) -> str:
    """'' when ``value`` fits the annotation ``tp`` (ints are accepted for floats, which must be finite: no option
    is meant to be NaN or infinite), else what was expected."""
    if tp is inspect.Parameter.empty or tp is Any:
        return ""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return ""
        inner = [a for a in args if a is not type(None)]
        misses = [type_problem(value, a) for a in inner]
        return "" if any(m == "" for m in misses) else misses[0]
    if origin in (list, tuple, typing.List, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            return "a list"
        inner = args[0] if args else Any
        return next((f"a list of {m.removeprefix('a ').removeprefix('an ')}s" for m in
                     (type_problem(v, inner) for v in value) if m), "")
    if origin in (dict, typing.Dict):
        return "" if isinstance(value, dict) else "a mapping"
    if tp is bool:
        return "" if isinstance(value, bool) else "true or false"
    if tp is int:
        return "" if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "a number"
        return "" if math.isfinite(value) else "a finite number"
    if tp is str:
        return "" if isinstance(value, str) else "a string"
    return ""  # anything else (a dtype, a device, a callable) is the factory's own business


class Registry(Generic[T]):
    """Maps names to factories, each with the metadata given at registration.

    Args:
        kind: What the registry holds ("model", "dataset", ...); used in error messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, T] = {}
        self._meta: Dict[str, Dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator: ``@MODELS.register("lenet5")``, ``@PROJECTIONS.register("dense", random=True)``.

        Raises:
            ValueError: a duplicate name.
        """

        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            self._meta[name] = dict(meta)
            return obj

        return deco

    def get(self, name: str) -> T:
        """The entry registered as ``name``.

        Raises:
            ConfigError: unknown name; the message lists the known ones.
        """
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} {_short(name)}: choose one of {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def meta(self, name: str) -> Dict[str, Any]:
        """The metadata ``name`` was registered with (raises ConfigError for an unknown name)."""
        self.get(name)
        return self._meta[name]

    def check_options(self, name: str, kwargs: Dict, skip: int, internal: Sequence[str] = ()) -> None:
        """Raise ConfigError naming keyword options the factory ``name`` does not take, or gives the wrong type.

        Args:
            skip: leading positional parameters of the factory that are not options.
            internal: keyword parameters raysub itself passes (not user options).
        """
        factory = self.get(name)
        target = factory.__init__ if inspect.isclass(factory) else factory
        params = list(inspect.signature(factory).parameters.values())[skip:]
        try:
            hints = typing.get_type_hints(target)
        except Exception:  # an annotation that does not resolve: names are still checked
            hints = {}
        problems = []
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            known = [p.name for p in params if p.name not in internal]
            unknown = sorted(set(kwargs) - set(known)) + sorted(set(kwargs) & set(internal))
            if unknown:
                options = f"its options are {', '.join(known)}" if known else "it takes no options"
                problems.append(f"{self.kind} {name!r} got unexpected option(s) "
                                f"{_short(', '.join(repr(u) for u in unknown), quote=False)}: {options}")
        for p in params:
            if p.name in kwargs and p.name not in internal:
                want = type_problem(kwargs[p.name], hints.get(p.name, p.annotation))
                if want:
                    problems.append(f"{self.kind} {name!r} option {p.name}={_short(kwargs[p.name])}: expected {want}")
        if problems:
            raise ConfigError(problems)

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
