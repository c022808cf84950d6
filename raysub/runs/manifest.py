"""The typed manifest: ``manifest.json``, the run's one commit record, read and written here only.

`Manifest` names every key a raysub run's manifest holds; `Manifest.read` applies the checks a command makes
before trusting a run, `Manifest.to_json` gives the dict written. The JSON stays what it was before the type
existed: keys in the order the file had them (a new manifest in `Manifest.names` order), optional keys absent
while unset and unknown keys kept (`extra`), so an old run reads and writes back byte for byte.

Every reader goes through `Manifest.read` (checked) or `Manifest.peek` (tolerant) and the attributes: the type
has no mapping view, so a key read is a name a type checker and a grep can follow.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from raysub.config import Config, load_yaml
from raysub.errors import StorageError
from raysub.runs import layout
from raysub.storage import RunDir


@dataclass
class Manifest:
    """A run's manifest. Fields in the order a new run writes them; None is "absent" for every key the file
    does not hold."""
    raysub_version: Optional[str] = None
    versions: Optional[Dict[str, str]] = None  # python, torch, ray, pyarrow
    git_revision: Optional[str] = None
    created: Optional[str] = None  # UTC, ISO 8601 to the second
    host: Optional[str] = None
    world_size: Optional[int] = None
    device: Optional[str] = None  # "cuda" or "cpu"
    num_params: Optional[int] = None  # trainable: the flat vector every stage sees
    num_params_total: Optional[int] = None  # frozen ones (UV's W0) too
    init_from: Optional[Dict[str, Any]] = None  # the base weights' run and sha256 (train.init_from)
    theta0_from: Optional[Dict[str, Any]] = None  # the basis run's θ0 (train.basis_run)
    uv_layers: Optional[List[Any]] = None
    layout: Optional[List[Any]] = None  # the flat vector's parameters (name, shape, offset)
    blocks: Optional[List[Dict[str, int]]] = None  # the trajectory's blocks, one per sampling worker
    stages: Dict[str, Any] = field(default_factory=dict)  # sample, basis, train.LABEL, l2o: what each committed
    shards: Dict[str, str] = field(default_factory=dict)  # path in the run → sha256
    config: Optional[Dict[str, Any]] = None  # the resolved config
    summary: Optional[Dict[str, Any]] = None  # {"results": {...}, "timings": {...}, ...}
    theta0_norm: Optional[float] = None
    num_snapshots: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)  # keys this type does not name (kept as they were)
    # the keys in the order the file held them (empty for a new manifest): written back in that order
    order: List[str] = field(default_factory=list, repr=False, compare=False)

    @staticmethod
    def names() -> List[str]:
        """The JSON keys this type names, in the order a new manifest writes them."""
        return [f.name for f in dataclasses.fields(Manifest) if f.name not in ("extra", "order")]

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "Manifest":
        """The manifest of a parsed ``manifest.json`` (any keys; unknown ones go to `extra`)."""
        known = set(cls.names())
        m = cls(**{k: v for k, v in data.items() if k in known})
        m.extra = {k: v for k, v in data.items() if k not in known}
        m.order = list(data)
        return m

    def _present(self, name: str) -> bool:
        """Whether the JSON holds ``name``: a key the file had, an unknown key set since, or a named field set
        (not None; for a manifest read from a file, an empty ``stages``/``shards`` it did not have stays out)."""
        if name in self.order:
            return True
        if name not in self.names():
            return name in self.extra
        value = getattr(self, name)
        return value is not None and not (self.order and value == {})

    def to_json(self) -> Dict[str, Any]:
        """The dict written as ``manifest.json``: the file's own key order first, then the keys set since."""
        keys = [k for k in self.order if self._present(k)]
        keys += [k for k in self.names() + list(self.extra) if k not in keys and self._present(k)]
        return {k: (self.extra[k] if k in self.extra else getattr(self, k)) for k in keys}

    @classmethod
    def read(cls, run: RunDir) -> "Manifest":
        """The committed manifest of ``run``, checked: it exists and is a raysub manifest (a run written before
        the manifest held its config and summary gets them from ``config.yaml`` / ``summary.json``). Writes
        nothing.

        Raises:
            StorageError: no manifest, or not one of raysub's.
        """
        if not run.exists(layout.MANIFEST):
            raise StorageError(f"{run.uri} is not a raysub run directory (no manifest.json): run 'raysub sample' "
                               f"first")
        data = run.read_json(layout.MANIFEST)
        if not isinstance(data, dict) or "shards" not in data or "stages" not in data:
            raise StorageError(f"{run.path(layout.MANIFEST)} is not a raysub manifest: start the run again with "
                               f"--overwrite")
        manifest = cls.from_json(data)
        if "config" not in data:  # a run written before the manifest held them
            manifest.config = stored_config(run)
            manifest.order.append("config")
        if "summary" not in data:
            manifest.summary = (run.read_json(layout.SUMMARY) if run.exists(layout.SUMMARY)
                                else {"results": {}, "timings": {}})
            manifest.order.append("summary")
        return manifest

    @classmethod
    def peek(cls, run: RunDir) -> "Manifest":
        """The manifest as the file holds it, unchecked, or an empty one when the run has none: the tolerant
        view of readers that also serve runs written before a stage committed (a basis, a resume's check). A
        file that is not a JSON object reads as empty too (`Manifest.read` refuses it)."""
        data = run.read_json(layout.MANIFEST) if run.exists(layout.MANIFEST) else {}
        return cls.from_json(data) if isinstance(data, dict) else cls()

    def write(self, run: RunDir) -> str:
        """Write ``manifest.json`` (one atomic rename); returns its sha256. `raysub.runs.records.commit` is the
        one caller: it fences the lock first and syncs the copies after."""
        return run.write_json(layout.MANIFEST, self.to_json())


def stored_config(run: RunDir) -> Optional[Dict[str, Any]]:
    """The run's resolved config as a dict (the manifest's; ``config.yaml`` for a run without one), or None."""
    config = Manifest.peek(run).config
    if config is not None:
        return config
    if run.exists(layout.CONFIG):
        data = load_yaml(run.read_text(layout.CONFIG))
        return Config.from_dict(data).to_dict()
    return None
