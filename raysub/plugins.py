"""Every plug-in, registered: importing this module fills the four registries.

A plug-in is one file and one ``register`` call (`raysub.registry`), so its name exists only once its module has been
imported. Each plug-in package imports its own families (``raysub.projections``, ``raysub.optim``,
``raysub.models``, ``raysub.data``); the learned optimizer ``l2o`` lives in ``raysub.l2o`` and is registered here, so
that ``raysub.optim`` need not import ``raysub.l2o`` (which builds on ``raysub.optim.base``: the two packages would
import each other).

Import this module (or the registries through it) wherever a name is looked up in a registry: config checks
(`raysub.pipeline.plan`), the engine's task (`raysub.engine.task`, which every Ray worker that trains imports) and
the drivers. A new plug-in package is one more import below.
"""
from raysub.data import DATASETS
from raysub.models import MODELS
from raysub.optim import OPTIMIZERS
from raysub.projections import PROJECTIONS

import raysub.l2o.optimizer  # noqa: F401  (registers "l2o" in OPTIMIZERS)

__all__ = ["DATASETS", "MODELS", "OPTIMIZERS", "PROJECTIONS"]
