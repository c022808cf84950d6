"""Where a meta-training run keeps its state: the generations ``l2o/ckpt/GEN/`` and the flat copies in ``l2o/``.

The names live in the run-directory layout (`raysub.runs.layout`); this module keeps the short names that
meta-training (`raysub.l2o.meta_train`), the weights reader (`raysub.l2o.weights`) and ``l2o tune`` use.
"""
from __future__ import annotations

from raysub.runs.layout import L2O_CHECKPOINT as CHECKPOINT
from raysub.runs.layout import L2O_GENERATIONS as GENERATIONS
from raysub.runs.layout import L2O_HISTORY as HISTORY
from raysub.runs.layout import L2O_STATE_FILES as STATE_FILES
from raysub.runs.layout import L2O_WEIGHTS as WEIGHTS
from raysub.runs.layout import l2o_state_files as state_files

__all__ = ["CHECKPOINT", "GENERATIONS", "HISTORY", "STATE_FILES", "WEIGHTS", "state_files"]
