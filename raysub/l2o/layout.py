"""Where a meta-training run keeps its state: the generations ``l2o/ckpt/GEN/`` and the flat copies in ``l2o/``.

Read by meta-training (`raysub.l2o.train`, which writes them), by the weights reader (`raysub.l2o.weights`, which
resolves ``RUN/l2o/weights.pt`` to the committed generation) and by ``l2o tune``; it sits below all three so that
none imports another for a file name.
"""
from __future__ import annotations

from typing import Any, Dict

# the flat layout of runs written before generations; WEIGHTS and HISTORY stay as copies of the committed state
CHECKPOINT, WEIGHTS, HISTORY = "l2o/checkpoint.pt", "l2o/weights.pt", "l2o/history.json"
GENERATIONS = "l2o/ckpt"  # the meta-training state's generations: l2o/ckpt/GEN/{checkpoint.pt,weights.pt,history.json}
STATE_FILES = ("checkpoint.pt", "weights.pt", "history.json")


def state_files(manifest: Dict[str, Any]) -> Dict[str, str]:
    """The committed meta-training state's files that the manifest holds, by name (``checkpoint.pt``,
    ``weights.pt``, ``history.json``) → path in the run: in the generation ``stages.l2o.dir``, or flat in ``l2o/``
    for a run written before generations. Empty when nothing is committed."""
    base = manifest.get("stages", {}).get("l2o", {}).get("dir") or "l2o"
    shards = manifest.get("shards", {})
    return {name: f"{base}/{name}" for name in STATE_FILES if f"{base}/{name}" in shards}
