"""The run-directory service (issue 24 §2), unit tier (no Ray, no subprocess): the typed manifest reads and writes
back the bytes older raysub wrote, the layout names every path once, and `open_run` refuses before it writes.
"""
from __future__ import annotations

import ast
import json
import os
import re
from typing import Dict, List, Set

import pytest

from raysub.config import load_config
from raysub.errors import ConfigError, StorageError
from raysub.runs import layout
from raysub.runs.manifest import Manifest
from raysub.runs.open import absolute_uris, open_run
from raysub.storage import RunDir

# what raysub wrote before the manifest had a type (raysub.pipeline.records.new_manifest, init_run, the sample stage):
# RunDir.write_json's json.dumps(indent=2) + "\n", keys in that code's order, optional keys (init_from) where set
STORED = {
    "raysub_version": "0.1.0",
    "versions": {"python": "3.11.9", "torch": "2.3.1", "ray": "2.34.0", "pyarrow": "17.0.0"},
    "git_revision": "29e2248+dirty",
    "created": "2026-12-07T09:27:40+00:00",
    "host": "node-1",
    "world_size": 2,
    "device": "cpu",
    "num_params": 4810,
    "num_params_total": 4810,
    "init_from": {"run": "/runs/base", "sha256": "ab" * 32},
    "layout": [{"name": "1.weight", "shape": [64, 64], "offset": 0, "numel": 4096}],
    "blocks": [{"block": 0, "start": 0, "stop": 2405}, {"block": 1, "start": 2405, "stop": 4810}],
    "stages": {"sample": {"complete": True, "num_snapshots": 21, "stream_gram": None}},
    "shards": {"theta0.pt": "cd" * 32},
    "config": {"seed": 0, "run_dir": "/runs/x"},
    "summary": {"results": {"sgd": {"test_acc": 0.8125, "curve": [0.5, float("nan")]}}, "timings": {}},
    "theta0_norm": 12.5,
    "num_snapshots": 21,
}


def _stored_bytes(data) -> bytes:
    from raysub.storage import strict_json

    return (json.dumps(strict_json(data), indent=2, allow_nan=False) + "\n").encode()


def test_a_stored_manifest_reads_and_writes_back_byte_for_byte(tmp_path):
    """Old code wrote it, the typed manifest reads it and writes it again: the same bytes (key order, optional keys
    absent, NaN as null). Catches fields written in the dataclass's order instead of the file's, or an unset
    optional key written as null."""
    run = RunDir(str(tmp_path))
    (tmp_path / layout.MANIFEST).write_bytes(_stored_bytes(STORED))
    before = (tmp_path / layout.MANIFEST).read_bytes()
    manifest = Manifest.read(run)
    assert (manifest.num_params, manifest.world_size, manifest.num_snapshots) == (4810, 2, 21)
    assert manifest.init_from == {"run": "/runs/base", "sha256": "ab" * 32} and manifest.theta0_from is None
    assert manifest.uv_layers is None and manifest.extra == {}
    assert manifest.summary["results"]["sgd"]["curve"] == [0.5, None]
    manifest.write(run)
    assert (tmp_path / layout.MANIFEST).read_bytes() == before
    assert list(manifest.to_json()) == list(STORED)


def test_an_old_manifest_keeps_its_order_and_unknown_keys(tmp_path):
    """A run from before ``num_params_total``, config and summary in the manifest, with a key this type does not
    name (a sweep's ``kind``): read, the config and summary come from the copies and go last, in that order; the
    rest is written back where it was."""
    run = RunDir(str(tmp_path))
    old = {"kind": "sweep", "num_params": 10, "stages": {}, "shards": {"theta0.pt": "ef" * 32}}
    (tmp_path / layout.MANIFEST).write_bytes(_stored_bytes(old))
    (tmp_path / layout.SUMMARY).write_text(json.dumps({"results": {"a": 1}, "timings": {}}))
    manifest = Manifest.read(run)
    assert manifest.extra == {"kind": "sweep"} and manifest.config is None
    assert list(manifest.to_json()) == ["kind", "num_params", "stages", "shards", "config", "summary"]
    assert manifest.to_json()["summary"] == {"results": {"a": 1}, "timings": {}}
    assert Manifest.from_json(old).to_json() == old and list(Manifest.from_json(old).to_json()) == list(old)


def test_a_new_manifest_writes_the_fields_in_order_and_leaves_unset_ones_out():
    m = Manifest(raysub_version="0.1.0", num_params=3, layout=[], blocks=[], config={}, summary={})
    m.theta0_norm = 1.0
    m.num_snapshots = 4
    assert list(m.to_json()) == ["raysub_version", "num_params", "layout", "blocks", "stages", "shards", "config",
                                 "summary", "theta0_norm", "num_snapshots"]
    # readers use the attributes: an unset key is None and stays out of the JSON; there is no mapping view
    assert m.num_params == 3 and m.init_from is None and "init_from" not in m.to_json()
    m.stages["sample"] = {"complete": True}
    assert m.to_json()["stages"] == {"sample": {"complete": True}}
    with pytest.raises(TypeError):
        m["theta0_from"]


def test_reading_a_manifest_refuses_a_missing_or_foreign_file(tmp_path):
    run = RunDir(str(tmp_path))
    with pytest.raises(StorageError, match=r"is not a raysub run directory \(no manifest.json\): run 'raysub "
                                           r"sample' first"):
        Manifest.read(run)
    (tmp_path / layout.MANIFEST).write_text('{"stages": {}}')
    with pytest.raises(StorageError, match=r"manifest.json is not a raysub manifest: start the run again with "
                                           r"--overwrite"):
        Manifest.read(run)


def test_the_layout_names_every_run_path():
    assert (layout.MANIFEST, layout.CONFIG, layout.SUMMARY, layout.THETA0, layout.LOCK) == (
        "manifest.json", "config.yaml", "summary.json", "theta0.pt", "raysub.lock")
    assert layout.train_z("psgd") == "train/psgd.pt" and layout.curve("sgd") == "curves/sgd.json"
    assert layout.train_checkpoint("psgd") == "train-psgd" and layout.CHECKPOINTS == "checkpoints"
    assert layout.spectrum("basis/0123456789ab") == "basis/0123456789ab/spectrum.json"
    assert layout.trajectory_block(7) == "trajectory/block_007" and layout.STREAM_GRAM == "trajectory/gram.pt"
    gen = layout.new_basis_prefix()
    assert gen.startswith("basis/") and len(gen) == len("basis/") + 12 and gen != layout.new_basis_prefix()
    assert (layout.L2O_WEIGHTS, layout.L2O_GENERATIONS) == ("l2o/weights.pt", "l2o/ckpt")
    state = layout.l2o_state_files(Manifest(stages={"l2o": {"dir": "l2o/ckpt/g1"}},
                                            shards={"l2o/ckpt/g1/weights.pt": "x", "l2o/weights.pt": "y"}))
    assert state == {"weights.pt": "l2o/ckpt/g1/weights.pt"}


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", *overrides])


def test_open_run_refuses_before_writing(tmp_path):
    """Both flags; an existing run without a flag; a resume with another config: one line each, no Ray started,
    nothing written (the run's files are as they were, no lock left)."""
    def no_ray():
        raise AssertionError("Ray started")

    with pytest.raises(ConfigError, match="^--resume and --overwrite exclude each other: pick one$"):
        with open_run(_cfg(tmp_path), resume=True, overwrite=True, start_ray=no_ray):
            pass
    assert not (tmp_path / "run").exists()  # the lock's directory is removed again
    cfg = _cfg(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / layout.CONFIG).write_text(cfg.to_yaml())
    with pytest.raises(ConfigError, match=r"already exists: pass --resume to continue it or --overwrite"):
        with open_run(_cfg(tmp_path), resume=False, overwrite=False, start_ray=no_ray):
            pass
    with pytest.raises(ConfigError, match=r"^--resume: this config differs from the run's .* in seed \(0 in the run, "
                                          r"1 now\)"):
        with open_run(_cfg(tmp_path, "seed=1"), resume=True, overwrite=False, start_ray=no_ray):
            pass
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [layout.CONFIG]


def test_open_run_order_and_what_it_yields(tmp_path):
    """The workflow's checks run under the lock before Ray; a refusal in them starts no Ray. Without ``info`` no θ0
    is written and no manifest yielded; run_dir and the train.* references become absolute."""
    calls = []
    cfg = _cfg(tmp_path, "train.init_from=rel/base")
    with open_run(cfg, resume=False, overwrite=False, checks=lambda run, resuming: calls.append(("checks", resuming)),
                  start_ray=lambda: calls.append("ray"), announce=lambda: "hello", say=calls.append) as opened:
        assert (tmp_path / "run" / layout.LOCK).exists()
        assert opened.resuming is False and opened.manifest is None and opened.done is False
    assert calls == [("checks", False), "ray", "hello"]
    assert cfg.run_dir == RunDir(str(tmp_path / "run")).uri and cfg.train.init_from == RunDir("rel/base").uri

    def refuse(run, resuming):
        raise ConfigError("no")

    with pytest.raises(ConfigError, match="^no$"):
        with open_run(_cfg(tmp_path), resume=False, overwrite=False, checks=refuse,
                      start_ray=lambda: calls.append("ray again")):
            pass
    assert "ray again" not in calls
    cfg = _cfg(tmp_path, "train.basis_run=b")
    absolute_uris(cfg, ("basis_run",))
    assert cfg.train.basis_run == RunDir("b").uri


def test_open_run_opens_an_existing_run_for_a_stage(tmp_path):
    """``existing=`` (``raysub basis``/``train RUN``): a missing run or one without a manifest is refused before
    anything is written; the stage's checks see the committed manifest and a refusal there leaves the run as it
    was (not settled, no Ray); past them the run is settled, and ``done`` skips Ray."""
    def no_ray():
        raise AssertionError("Ray started")

    cfg = _cfg(tmp_path)
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(StorageError, match=r"run does not exist: pass the run directory"):
        with open_run(cfg, existing=run, start_ray=no_ray):
            pass
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    with pytest.raises(StorageError, match=r"is not a raysub run directory \(no manifest.json\)"):
        with open_run(cfg, existing=run, start_ray=no_ray):
            pass
    assert os.listdir(tmp_path / "run") == []
    run.write_json(layout.MANIFEST, {"stages": {}, "shards": {}, "config": cfg.to_dict(),
                                     "summary": {"results": {}, "timings": {}}})

    def refuse(run, manifest):
        assert isinstance(manifest, Manifest) and manifest.stages == {}
        raise ConfigError("no")

    with pytest.raises(ConfigError, match="^no$"):
        with open_run(cfg, existing=run, checks=refuse, start_ray=no_ray):
            pass
    assert os.listdir(tmp_path / "run") == [layout.MANIFEST]
    calls = []
    with open_run(cfg, existing=run, checks=lambda r, m: calls.append("checks"), done=lambda m: True,
                  start_ray=no_ray) as opened:
        assert opened.done and opened.resuming and opened.run is not None and opened.manifest.stages == {}
    assert sorted(os.listdir(tmp_path / "run")) == [layout.CONFIG, layout.MANIFEST, layout.SUMMARY]
    with open_run(cfg, existing=run, checks=lambda r, m: calls.append("checks"), done=lambda m: False,
                  start_ray=lambda: calls.append("ray")) as opened:
        assert (tmp_path / "run" / layout.LOCK).exists() and not opened.done
    assert calls == ["checks", "checks", "ray"]


# ---------------------------------------------------------------------------------------------------------
# run paths are named in raysub.runs.layout only

# a string constant (or an f-string's literal part) that is one of the run's record files, or a path under one of
# its stage directories
RUN_PATH_LITERAL = re.compile(r"(^|/)(manifest\.json|theta0\.pt|summary\.json|config\.yaml)$"
                              r"|^(train|curves|basis|trajectory)/")
# the files that may spell run paths out: the layout itself, and storage (a layer the layout imports: RunDir's own
# checks read the manifest and θ0 by name)
LAYOUT_FILES = {"raysub/runs/layout.py", "raysub/storage.py"}
# file → the literals that are not run paths, each with its reason
NOT_RUN_PATHS: Dict[str, Dict[str, str]] = {
    "raysub/config/reading.py": {
        "config.yaml": "raysub.runs imports raysub.config: the config reader cannot import the layout (a package "
                       "cycle); it recognises a run's own config.yaml by name",
        "manifest.json": "the same cycle: a config.yaml beside a manifest.json is a run's own",
    },
}


def _docstrings(tree: ast.AST) -> Set[int]:
    """ids of the module's, classes' and functions' docstring nodes (prose, not paths)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def run_path_literals(root: str) -> List[str]:
    """``file:line: 'literal'`` for every run-path literal in the package under ``root`` outside `LAYOUT_FILES` and
    `NOT_RUN_PATHS`."""
    base = os.path.dirname(root)
    found = []
    for dirpath, _, files in os.walk(root):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, base).replace(os.sep, "/")
            if rel in LAYOUT_FILES:
                continue
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read(), path)
            skip = _docstrings(tree)
            allowed = NOT_RUN_PATHS.get(rel, {})
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip \
                        and RUN_PATH_LITERAL.search(node.value) and node.value not in allowed:
                    found.append(f"{rel}:{node.lineno}: {node.value!r}")
    return sorted(found)


def test_run_paths_are_spelled_only_in_the_layout():
    """A run's paths are named once, in `raysub.runs.layout` (moving a file is one edit there). Catches a module
    that writes ``f"train/{label}.pt"`` or reads ``"manifest.json"`` itself."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "raysub")
    found = run_path_literals(root)
    assert not found, ("run paths spelled outside raysub/runs/layout.py (use its names): " + "; ".join(found))


def test_the_run_path_scan_finds_a_literal(tmp_path):
    """The scan itself: a path literal and an f-string's are found with file:line; a docstring, a message that
    mentions a file, and a literal in an allowed file are not."""
    pkg = tmp_path / "raysub"
    (pkg / "runs").mkdir(parents=True)
    (pkg / "runs" / "layout.py").write_text('MANIFEST = "manifest.json"\n')
    (pkg / "x.py").write_text('"""reads manifest.json"""\n\ndef f(run, label):\n    """``train/L.pt``"""\n'
                              '    run.read_json("manifest.json")\n    return f"train/{label}.pt", "no manifest.json"\n')
    assert run_path_literals(str(pkg)) == ["raysub/x.py:5: 'manifest.json'", "raysub/x.py:6: 'train/'"]
