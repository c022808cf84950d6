"""``train.init_from``: a trained run's weights as this run's θ0 (W0 of a UV reparametrisation).

The weights are the base run's ``model.pt`` — the state dict 'raysub sample' writes when its SGD run ends — read
with the sha256 its manifest commits. A base run that sampled a UV model is folded first (W = W0 + U V,
`raysub.models.lowrank.fold_uv`). The base must be the same architecture: the same registered model with the same
options (defaults filled in) and the same parameter shapes — except the output layer, which starts fresh (the
seeded one) when the class counts differ, as a new head for a new task.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List

from torch import nn

from raysub.errors import ConfigError
from raysub.models.lowrank import fold_uv
from raysub.models.registry import MODELS
from raysub.runs import layout
from raysub.runs.manifest import Manifest
from raysub.storage import RunDir


def _resolved_options(name: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """``options`` with the factory's defaults filled in (``{}`` and ``{dim: 64}`` are the same vit), tuples as
    lists (a default ``(64,)`` is the ``[64]`` a YAML file gives)."""
    params = list(inspect.signature(MODELS.get(name)).parameters.values())[2:]
    resolved = {**{p.name: p.default for p in params if p.default is not inspect.Parameter.empty}, **options}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()}


def output_layer(model: nn.Module) -> str:
    """Name of the model's last linear layer (its classifier): the one part allowed to differ from the base."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else ""


def load_init_from(model: nn.Module, cfg) -> Dict[str, Any]:
    """Load ``cfg.train.init_from``'s trained weights into ``model`` (the registered architecture, before any UV
    transformation), in place.

    Returns:
        {"uri", "sha256", "fresh": keys left as seeded (an output layer of another class count)}.

    Raises:
        ConfigError: no such run, no trained weights there, another architecture — one line each.
    """
    uri = cfg.train.init_from
    run = RunDir(uri)
    key = f"train.init_from={uri}"
    if not run.exists(layout.MANIFEST):
        what = "does not exist" if not run.exists() else "is not a raysub run directory (no manifest.json)"
        raise ConfigError(f"{key} {what}: pass the run directory of a finished 'raysub sample' (or 'raysub run')")
    manifest = Manifest.peek(run)
    checksum = manifest.shards.get(layout.MODEL)
    if checksum is None:
        sample = manifest.stages.get("sample")
        if sample is None:
            why = ("it was not made by 'raysub sample' (or 'raysub run'), the only stage that commits its trained "
                   "weights: pass the run that trained the base model with full-parameter SGD/AdamW")
        elif not sample.get("complete"):
            why = f"its sampling is unfinished: finish it with raysub sample {run.arg(layout.CONFIG)} --resume"
        else:
            why = (f"it was sampled before raysub wrote model.pt: resample it (raysub sample "
                   f"{run.arg(layout.CONFIG)} --overwrite)")
        raise ConfigError(f"{key} holds no trained weights (model.pt): {why}")
    base = (manifest.config or {}).get("model", {})
    if base.get("name") != cfg.model.name:
        raise ConfigError(f"{key} is a {base.get('name')!r} run, this run's model is {cfg.model.name!r}: init_from "
                          f"needs a run of the same architecture")
    ours = _resolved_options(cfg.model.name, dict(cfg.model.options))
    theirs = _resolved_options(base["name"], dict(base.get("options") or {}))
    # None is "derive it" (vit's patch from the input): the parameter shapes below decide those
    diff = [k for k in sorted(set(ours) | set(theirs))
            if ours.get(k) != theirs.get(k) and ours.get(k) is not None and theirs.get(k) is not None]
    if diff:
        shown = ", ".join(f"{k}={theirs.get(k)!r} there, {ours.get(k)!r} here" for k in diff[:4])
        raise ConfigError(f"{key} is another {cfg.model.name} ({shown}): set model.options as the base run's")
    state = fold_uv(run.read_torch(layout.MODEL, checksum))
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        k = (missing or extra)[0]
        raise ConfigError(f"{key}: {'this model has' if missing else 'the base has'} {k!r} and the other does not "
                          f"({len(missing)} missing, {len(extra)} unexpected): not the same architecture")
    head = output_layer(model)
    fresh: List[str] = []
    for k, v in own.items():
        if tuple(state[k].shape) == tuple(v.shape):
            continue
        if head and k.startswith(head + "."):
            fresh.append(k)
            continue
        hint = f"data {cfg.data.name}" + (", model.options.patch" if "patch" in ours else "")
        raise ConfigError(f"{key}: {k} is {tuple(state[k].shape)} there and {tuple(v.shape)} here (another input "
                          f"shape? {hint}): not the same architecture")
    model.load_state_dict({k: (own[k] if k in fresh else state[k]) for k in own})
    return {"uri": run.uri, "sha256": checksum, "fresh": fresh}
