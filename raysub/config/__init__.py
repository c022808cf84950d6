"""Typed run configuration: dataclasses, YAML files, dotted ``key=value`` overrides.

This package is the schema and its own checks, nothing else, in four modules, each importing only those before it:

- `yamlio`: the YAML raysub reads and writes, and the limits of what a config may hold;
- `checks`: the type checker (`build`: unknown keys, wrong types, `Literal` choices, seeds and sizes) and the value
  ranges of the schema's numbers (`schema_problems`);
- `schema`: the dataclasses, their defaults and help, and `Config`;
- `reading`: config files, overrides, `merge` and `load_config`.

What a section *means* is checked by the package that owns it — dataset paths by `raysub.data`, optimizer and
projection options by their registries, the snapshot count by sampling, the tracking section by
`raysub.tracking` — and `raysub.pipeline.plan` asks each of them, collecting every problem into one message before
anything starts. `to_dict`/`from_dict` carry a config through Ray.
"""
from raysub.config.checks import SAFE_NAME, SEEDS, TEXT_KEYS, build, choice_problems, positive, schema_problems
from raysub.config.reading import (load_config, merge, parse_overrides, run_of_config, shipped_configs)
from raysub.config.schema import (BasisConfig, ClusterConfig, ComputeConfig, Config, DataConfig, L2OConfig,
                                  L2OTuneConfig, ModelConfig, SampleConfig, SGDConfig, SweepConfig, TrackingConfig,
                                  TrainConfig, UVConfig)
from raysub.config.yamlio import (INT64, MAX_DEPTH, MAX_FILE, MAX_NAME, MAX_OVERRIDE, MAX_TEXT, SHOWN, _Dumper,
                                  load_yaml)

__all__ = [
    "BasisConfig", "ClusterConfig", "ComputeConfig", "Config", "DataConfig", "INT64", "L2OConfig", "L2OTuneConfig",
    "MAX_DEPTH", "MAX_FILE", "MAX_NAME", "MAX_OVERRIDE", "MAX_TEXT", "ModelConfig", "SAFE_NAME", "SEEDS", "SHOWN",
    "SGDConfig", "SampleConfig", "SweepConfig", "TEXT_KEYS", "TrackingConfig", "TrainConfig", "UVConfig", "_Dumper",
    "build", "choice_problems", "load_config", "load_yaml", "merge", "parse_overrides", "positive",
    "run_of_config", "schema_problems", "shipped_configs",
]
