"""Reading a config: YAML files (local or a run directory's on object storage), dotted ``key=value`` overrides,
and `merge`, which lays one over the other; `load_config` does all three and builds the typed `Config`.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import yaml

from raysub.config.schema import Config
from raysub.config.yamlio import MAX_FILE, MAX_OVERRIDE, SHOWN, _parse, _plain, _Refused, _show
from raysub.errors import ConfigError, StorageError


def parse_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    """``["train.lr=0.5", "model.options.hidden=[32,32]"]`` -> nested dict; values are parsed as YAML."""
    nested: Dict[str, Any] = {}
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {_show(item)}: expected key=value, e.g. train.lr=0.5")
            continue
        key, raw = item.split("=", 1)
        if len(raw) > MAX_OVERRIDE:  # refused before parsing (PyYAML reads about 2 MB a second)
            problems.append(f"override {_show(key)}: a value of {len(raw):,} characters: at most {MAX_OVERRIDE:,}")
            continue
        try:
            value = _parse(raw) if raw != "" else None
        except _Refused as exc:  # an alias, a key twice, too deep: refused as in a file, never kept as text
            problems.append(f"override {_show(key)}: the value is not valid YAML ({exc.problem}): {exc.fix}")
            continue
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {_show(item)}: {part} is not a section")
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return nested


def merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """``update`` over ``base``, section by section.

    A plug-in's options belong to the plug-in: when ``update`` names another plug-in (``train.optimizer``,
    ``train.projection``, ``model.name``), the old plug-in's options (``*_options``, ``model.options``) are dropped
    and only the update's apply; for the same plug-in an explicit empty mapping (``train.optimizer_options={}``)
    clears them and a non-empty one is merged key by key.
    """
    out = dict(base)
    for key, value in update.items():
        options = "options" if key == "name" else f"{key}_options"
        if isinstance(value, str) and isinstance(out.get(options), dict) and value != base.get(key):
            out[options] = {}  # another plug-in: the old one's options would be unknown or wrong for it
    for key, value in update.items():
        if isinstance(value, dict) and not value and key.endswith("options"):
            out[key] = {}
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
            options = f"{key}_options"
            if (isinstance(value, str) and options in out and options not in update and value != base.get(key)):
                out[options] = {}
    return out


def shipped_configs() -> List[str]:
    """The names of the configs shipped in ``raysub/configs/`` (a name is its file without ``.yaml``)."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or the quickstart defaults when ``path`` is None) and apply overrides. A run's own
    ``config.yaml`` (`run_of_config`) gives the run directory it was read from, whatever run_dir it names.

    Raises:
        ConfigError: a file that is missing, unreadable, larger than `MAX_FILE`, not UTF-8, not YAML (aliases,
            duplicated keys and deep nesting included) or not a mapping; unknown keys, wrong types, integers
            out of range (all at once); a run's own config.yaml given ``run_dir=`` another directory.
    """
    data: Dict[str, Any] = {}
    if path is not None:
        data = _read_config_file(path)
    update = parse_overrides(overrides)
    own = run_of_config(path) if path is not None else None
    if own is not None:  # a run's own config.yaml: that run, wherever it now is (moved, copied)
        from raysub.storage import redact  # pyarrow: imported only when a run's own config is read

        asked = update.pop("run_dir", None)
        if asked is not None and _normalise_dir(str(asked)) != own:
            raise ConfigError(f"{redact(path)} is the config of the run in {redact(own)}: it runs there, not in "
                              f"run_dir={_show(asked)}; to start another run from it, copy the file out of the run "
                              f"directory first")
        data["run_dir"] = own
    return Config.from_dict(merge(data, update))


def run_of_config(path: str) -> Optional[str]:
    """The run directory (absolute path or URI) whose own ``config.yaml`` ``path`` is — the file is named
    config.yaml and lies beside a ``manifest.json`` (a run, a sweep, a meta-training) or a ``tune/`` folder (an l2o
    tuning, which has no manifest) — else None. A moved or copied run's config still names the old ``run_dir``;
    the run is where the file was read from."""
    from raysub.storage import RunDir, split_uri  # pyarrow: imported only when a config file is read

    parent, name = split_uri(path)
    if name != "config.yaml":
        return None
    run = parent if "://" in parent else _normalise_dir(parent)
    try:
        return run if RunDir(run).exists("manifest.json") or RunDir(run).exists("tune") else None
    except (OSError, ConfigError, StorageError):  # unreachable storage or a malformed URI: not a run we can tell
        return None


def _normalise_dir(uri: str) -> str:
    """A run directory as `RunDir` names it: local paths absolute, URIs as given (without a trailing slash)."""
    if "://" in uri:
        base, sep, query = uri.partition("?")
        return base.rstrip("/") + sep + query
    return os.path.abspath(os.path.expanduser(uri))


def _read_config_file(path: str) -> Dict[str, Any]:
    """The mapping a config file holds (``{}`` for an empty file); every failure is a one-line ConfigError."""
    try:
        if "://" in path:  # a run directory's config.yaml on object storage (`RunDir.arg` hints name those)
            from raysub.storage import open_uri  # its credentials adopted, S3 timeouts set; pyarrow only here

            fs, rel = open_uri(path)
            with fs.open_input_stream(rel) as fh:
                raw = fh.read(MAX_FILE + 1)
        else:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_FILE + 1)
        text = raw.decode("utf-8") if len(raw) <= MAX_FILE else None
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found: pass a YAML file or a shipped config name "
                          f"({', '.join(shipped_configs())})") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {path} is a directory: pass a YAML file (a run directory's config is "
                          f"{path.rstrip('/')}/config.yaml)") from None
    except OSError as exc:
        why = exc.strerror or str(exc).strip().splitlines()[0]  # pyarrow's errors (object storage) have no strerror
        raise ConfigError(f"config file {path} cannot be read ({why}): check the path and its permissions") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start}): save it as UTF-8") from None
    except ValueError as exc:  # a URI pyarrow cannot parse
        raise ConfigError(f"config file {path} cannot be read ({exc}): check the URI") from None
    if text is None:  # refused before parsing (PyYAML reads about 2 MB a second)
        raise ConfigError(f"config file {path} is larger than {MAX_FILE // 2 ** 20} MiB: a config is a few KB; pass "
                          f"the YAML config, not a data file")
    try:
        data = _parse(text)
    except _Refused as exc:
        raise ConfigError(f"config file {path} is not valid YAML ({exc.problem}): {exc.fix}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML ({_yaml_problem(exc)}): fix its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"the single value {_show(_plain(data))}"
        raise ConfigError(f"config file {path} holds {kind}, not a mapping of sections: write each section as "
                          f"a 'section:' line with indented 'key: value' lines, e.g. 'train:' then '  lr: 0.5'")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What the parser found wrong, and where, on one line."""
    if isinstance(exc, yaml.reader.ReaderError):
        return f"{exc.reason}: #x{exc.character:04x} at character {exc.position + 1}"
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem if len(problem) <= 2 * SHOWN else problem[:2 * SHOWN - 1] + '…'}{where}"
