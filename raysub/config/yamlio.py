"""raysub's YAML: one loader for every YAML raysub reads (configs keep numbers' spelling), its dumper, and the
limits of what a config may hold (depth, sizes, the characters of a value echoed in a message).

The bottom of `raysub.config`: the type checker (`checks`), the schema (`schema`) and the readers (`reading`) all
build on it.
"""
from __future__ import annotations

import re
from typing import Any, Dict

import yaml

# YAML 1.1 (PyYAML's SafeLoader) reads a float only with a dot, and an exponent only with a sign: '5e-4', '1E3'
# and '1.0e3' are strings there. YAML 1.2's core schema reads them as floats; this adds the forms 1.1 lacks.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")


# Limits of what raysub reads as YAML. A config is a few levels deep (section, options, a list in an option) and
# small; beyond these it is a mistake or an attack (an alias bomb expands exponentially, 100,000 nested brackets
# exhaust Python's recursion), refused as invalid YAML before it costs memory or a traceback.
MAX_DEPTH = 50
MAX_TEXT = 4096  # characters of one string value (a path is at most PATH_MAX = 4096 bytes)
MAX_NAME = 100  # characters of a string field that names a choice (every one but `TEXT_KEYS`)
MAX_OVERRIDE = 65536  # characters of one override's value
MAX_FILE = 2 ** 20  # bytes of a config file (the shipped ones are 1-3 KB)
INT64 = 2 ** 63  # every integer must fit a signed 64-bit integer: torch, numpy and Arrow hold no larger
SHOWN = 80  # characters of a user's value repeated in a message


def _show(value: Any) -> str:
    """``repr(value)`` for a one-line message, cut to `SHOWN` characters (a 10 MB value is not echoed)."""
    text = repr(value)
    return text if len(text) <= SHOWN else f"{text[:SHOWN - 1]}…"


class _Refused(yaml.YAMLError):
    """YAML that PyYAML reads but raysub refuses: an alias, a duplicated key, too deep, an integer too long.

    ``problem`` says what and where, ``fix`` what to do."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def _at(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats; numbers come back as `_SpelledInt`/`_SpelledFloat`. Refuses aliases, keys
    given twice in one mapping and nesting deeper than `MAX_DEPTH` (`_Refused`)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(f"alias *{event.anchor} at {_at(event.start_mark)}: raysub reads no anchors and aliases",
                           "write the value out where it is used (quote a text that starts with '*')")
        if self.depth >= MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels at {_at(self.peek_event().start_mark)}",
                           "a config is a few levels deep: check its brackets and indentation")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        # PyYAML keeps the last of two equal keys: the first section's settings would be lost without a word
        seen: Dict[Any, Any] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: PyYAML's own error names it
                continue
            if first is not key_node:
                raise _Refused(f"key {_show(_plain(key))} appears twice, lines {first.start_mark.line + 1} and "
                               f"{key_node.start_mark.line + 1}", "keep one")
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes the strings `_Loader` would read as numbers, and writes no aliases (it refuses them)."""

    def ignore_aliases(self, data):
        return True


for _cls in (_Loader, _Dumper):  # the dumper must quote what the loader reads as a number
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


class _Spelled:
    """A number as written in YAML: a string-valued field given ``1e-3`` or ``007`` keeps that text."""

    text: str


class _SpelledInt(_Spelled, int):
    pass


class _SpelledFloat(_Spelled, float):
    pass


def _spelled(kind, construct):
    """A YAML constructor wrapping ``construct``: its number as a ``kind`` that remembers the scalar's text."""

    def constructor(loader: yaml.SafeLoader, node: yaml.ScalarNode):
        try:
            number = kind(construct(loader, node))
        except ValueError:  # Python's limit on the digits of an int (4,300)
            raise _Refused(f"a number of {len(node.value):,} characters at {_at(node.start_mark)}",
                           "integers fit in 64 bits (below 2**63)") from None
        number.text = node.value
        return number

    return constructor


_Loader.add_constructor("tag:yaml.org,2002:int", _spelled(_SpelledInt, yaml.SafeLoader.construct_yaml_int))
_Loader.add_constructor("tag:yaml.org,2002:float", _spelled(_SpelledFloat, yaml.SafeLoader.construct_yaml_float))


def _parse(text: str) -> Any:
    """YAML ``text`` with YAML 1.2 floats, numbers keeping their spelling (`_coerce` makes them plain).

    Raises:
        yaml.YAMLError: invalid YAML; `_Refused` for YAML raysub does not read (aliases, duplicated keys, depth).
    """
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:  # the depth limit should come first; a backstop, never a traceback
        raise _Refused("nested too deeply", "a config is a few levels deep: check its brackets") from None


def _plain(value: Any) -> Any:
    """``value`` with every `_Spelled` number, at any depth, turned into a plain int or float."""
    if isinstance(value, _Spelled):
        return float(value) if isinstance(value, float) else int(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def load_yaml(text: str) -> Any:
    """Parse YAML as raysub reads every YAML: PyYAML's safe loader, but numbers in scientific notation ('5e-4',
    '1E3', '1.0e3') are floats, as in YAML 1.2. Returns plain Python values.

    Raises:
        yaml.YAMLError: invalid YAML.
    """
    return _plain(_parse(text))
