"""Typed run configuration: dataclasses, YAML files, dotted ``key=value`` overrides.

This module is the schema and its own checks, nothing else: unknown keys and wrong types (`from_dict`), and the
value ranges of the schema's numbers (`schema_problems`). What a section *means* is checked by the package that
owns it — dataset paths by `raysub.data`, optimizer and projection options by their registries, the snapshot
count by sampling — and `raysub.pipeline.plan` asks each of them, collecting every problem into one message
before anything starts. `to_dict`/`from_dict` carry a config through Ray.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from raysub.errors import ConfigError, StorageError


@dataclass
class DataConfig:
    name: str = field(default="digits", metadata={"help": "registered dataset name"})
    root: Optional[str] = field(default=None, metadata={"help": "dataset directory (default per dataset)"})
    batch_size: int = field(default=64, metadata={"help": "global training batch, split evenly over workers"})
    eval_batch_size: int = field(default=1024, metadata={"help": "global evaluation batch"})
    augment: bool = field(default=True, metadata={"help": "training augmentation where the dataset has one"})
    num_workers: int = field(default=0, metadata={"help": "data-loading processes per Ray worker (ImageNet)"})
    image_size: Optional[int] = field(default=None, metadata={"help": "ImageNet crop size (default 224)"})
    label_noise: float = field(default=0.0, metadata={"help": "fraction of training labels made random"})
    label_noise_seed: Optional[int] = field(default=None, metadata={"help": "which labels (default: seed)"})
    val_fraction: float = field(
        default=0.0, metadata={"help": "fraction of the training split held out as a validation split (sweeps)"})
    val_seed: int = field(default=0, metadata={"help": "which examples are held out (fixed across trials)"})
    classes: Optional[List[int]] = field(default=None, metadata={
        "help": "keep only these classes (all splits), relabelled 0..k-1 in the order given; None: all"})


@dataclass
class UVConfig:
    """The layerwise low-rank U·V reparametrisation (SL2O §3.2; raysub.models.lowrank): W = W0 + U V on the target
    linear layers, only U, V and the ``trainable`` parameters train."""

    rank: Optional[int] = field(default=None, metadata={
        "help": "r of every U (d1×r) and V (r×d2); unset: no reparametrisation (SL2O: 16)"})
    targets: List[str] = field(default_factory=lambda: ["q", "k", "v", "out"], metadata={
        "help": "linear layers reparametrised, by module-name suffix (vit: q, k, v, out of every attention)"})
    trainable: List[str] = field(default_factory=lambda: ["head"], metadata={
        "help": "parameters that train besides U and V, by module-name prefix (the classification head)"})
    init_std: Optional[float] = field(default=None, metadata={
        "help": "σ of U's N(0, σ²) entries (default 1/√rank: E[U Uᵀ] = I, so the first step on V moves W as full "
                "fine-tuning would, in expectation)"})


@dataclass
class ModelConfig:
    name: str = field(default="mlp", metadata={"help": "registered model name"})
    options: Dict[str, Any] = field(default_factory=dict, metadata={"help": "keyword options of the model"})
    uv: UVConfig = field(default_factory=UVConfig, metadata={"help": "low-rank U·V reparametrisation (SL2O §3.2)"})


@dataclass
class ClusterConfig:
    address: Optional[str] = field(
        default=None,
        metadata={"help": "Ray address; None starts a local cluster for the run, 'auto' joins a running one"},
    )
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers (DDP ranks)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker, nccl backend"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "logical CPUs each worker reserves"})
    num_cpus: Optional[int] = field(default=None, metadata={"help": "logical CPUs of a local cluster"})
    max_failures: int = field(default=0, metadata={"help": "worker-group restarts Ray Train may do"})
    wait_for_autoscaler: bool = field(default=False, metadata={
        "help": "joined cluster: when its nodes cannot hold the workers (no GPU, no node big enough for one worker, "
                "too few CPUs/GPUs in all), warn and wait for an autoscaler to add nodes instead of failing at once"})


@dataclass
class ComputeConfig:
    """How forward passes run on the worker's device: sampling SGD, subspace training and evaluation."""

    bf16: bool = field(default=False, metadata={
        "help": "bfloat16 autocast of forward passes (torch.autocast on the worker's device: CUDA, or CPU autocast "
                "when training on CPU, fast only with AMX/AVX-512 BF16); parameters and gradients stay float32"})
    channels_last: bool = field(default=False, metadata={
        "help": "NHWC memory format: 4-D inputs, and the sampled model's conv weights (subspace training keeps its "
                "flat θ buffer and converts kernels per call)"})


@dataclass
class SGDConfig:
    """The full-parameter SGD run: the baseline, and the run whose trajectory is sampled."""

    epochs: int = field(default=30, metadata={"help": "epochs of the full SGD run (baseline)"})
    lr: float = field(default=0.1, metadata={"help": "initial learning rate"})
    optimizer: str = field(default="sgd", metadata={
        "help": "sgd (heavy-ball momentum) | adamw (torch AdamW, betas (0.9, 0.999); sgd.momentum unused)"})
    momentum: float = field(default=0.9, metadata={"help": "heavy-ball momentum"})
    weight_decay: float = field(default=1e-4, metadata={"help": "L2 weight decay"})
    lr_milestones: List[int] = field(default_factory=list, metadata={"help": "epochs where lr *= lr_gamma"})
    lr_gamma: float = field(default=0.1, metadata={"help": "step-decay factor"})


@dataclass
class SampleConfig:
    epochs: int = field(default=15, metadata={"help": "snapshot window: the first N epochs of the SGD run"})
    snapshots_per_epoch: int = field(default=1, metadata={"help": "uniformly spaced snapshots per epoch"})
    snapshot_every_steps: int = field(default=0, metadata={"help": ">0: snapshot every k steps instead"})
    stream_gram: bool = field(
        default=False, metadata={"help": "build the trajectory's Gram while sampling (the basis needs no Gram pass)"})
    stream_gram_budget_mb: float = field(
        default=1024.0, metadata={"help": "per-rank memory for the streamed snapshots; beyond it: post-hoc Gram"})
    stop: str = field(default="fixed", metadata={
        "help": "fixed: sample.epochs; adaptive: end the window when the subspace stops moving (≤ sample.epochs)"})
    stop_threshold: float = field(default=0.05, metadata={
        "help": "adaptive: end when the reach residual (where SGD got outside last epoch's top-d subspace) falls "
                "by less than this fraction of itself per epoch"})
    stop_patience: int = field(default=2, metadata={"help": "adaptive: consecutive checks below the threshold"})
    min_snapshots: int = field(default=0, metadata={
        "help": "adaptive: snapshots before the window may end (0: basis.dim + 1)"})
    write_basis: bool = field(default=False, metadata={
        "help": "with stream_gram: ranks write the basis (basis.dim) at the window's end; no basis stage read"})


@dataclass
class BasisConfig:
    dim: int = field(default=15, metadata={"help": "principal components computed and stored (d)"})
    gram: str = field(default="auto", metadata={
        "help": "auto: the sampler's streamed Gram when the run has one, else a Gram pass; posthoc: always the pass"})


@dataclass
class TrainConfig:
    """Subspace training from theta0: theta = theta0 + P z, only z is trained."""

    optimizer: str = field(default="psgd", metadata={"help": "registered subspace optimizer"})
    projection: str = field(default="dldr", metadata={"help": "registered projection family"})
    projection_options: Dict[str, Any] = field(
        default_factory=dict, metadata={"help": "keyword options of the projection family (e.g. fastjl index)"})
    basis_run: Optional[str] = field(
        default=None, metadata={"help": "run directory whose DLDR basis 'dldr' reads (default: this run)"})
    dim: Optional[int] = field(default=None, metadata={"help": "leading basis columns used (default basis.dim)"})
    label: Optional[str] = field(default=None, metadata={"help": "name of the result (default: optimizer)"})
    epochs: int = field(default=40, metadata={"help": "subspace training epochs"})
    lr: float = field(default=1.0, metadata={"help": "initial learning rate (DLDR P-SGD: 1)"})
    momentum: float = field(default=0.9, metadata={"help": "momentum, kept in d dimensions"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "decay on z; non-zero pulls theta towards theta0 inside the subspace"}
    )
    lr_milestones: List[int] = field(default_factory=lambda: [30], metadata={"help": "lr step-decay epochs"})
    lr_gamma: float = field(default=0.1, metadata={"help": "step-decay factor"})
    batch_size: Optional[int] = field(default=None, metadata={"help": "global batch (default data.batch_size)"})
    basis_dtype: str = field(default="float32", metadata={"help": "storage of P on the device: float32|bfloat16"})
    optimizer_options: Dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "keyword options of the optimizer, checked against its signature (e.g. pbfgs c, beta)"})
    data_seed: Optional[int] = field(
        default=None, metadata={"help": "data order of the subspace run (default: seed); θ0 stays seed's"})
    init_from: Optional[str] = field(default=None, metadata={
        "help": "run directory or URI whose trained weights (its model.pt, written by 'raysub sample') become this "
                "run's θ0 — W0 of a UV reparametrisation; a head of another class count starts fresh"})


@dataclass
class SweepConfig:
    """Intrinsic-dimension sweep (``raysub sweep``): projection family × dimension × seed on Ray Tune."""

    families: List[str] = field(default_factory=lambda: ["dense", "fastfood", "fastjl"],
                                metadata={"help": "projection families swept"})
    dims: List[int] = field(default_factory=lambda: [10, 100, 1000], metadata={"help": "coarse grid of d"})
    family_dims: Dict[str, Any] = field(
        default_factory=dict, metadata={"help": "per-family coarse grid overriding dims, e.g. {dldr: [2, 5, 10]}"})
    family_options: Dict[str, Any] = field(
        default_factory=dict, metadata={"help": "per-family projection options, e.g. {fastjl: {index: mod}}"})
    seeds: List[int] = field(default_factory=lambda: [0, 1], metadata={"help": "seeds (projection and data order)"})
    threshold: float = field(default=0.9, metadata={"help": "d_int = smallest d reaching threshold × baseline"})
    baseline: Optional[float] = field(
        default=None, metadata={"help": "given baseline validation accuracy; None: the sweep trains it"})
    refine: int = field(default=3, metadata={"help": "extra d between last failing and first passing; 0: none"})
    workers_per_trial: int = field(default=1, metadata={"help": "1: a trial runs in its Tune actor; >1: DDP"})
    max_concurrent: Optional[int] = field(
        default=None, metadata={"help": "concurrent trials (default: as many as the cluster's CPUs/GPUs fit)"})
    asha: bool = field(default=False, metadata={"help": "ASHA early stopping on validation accuracy"})
    grace_period: int = field(default=2, metadata={"help": "ASHA: epochs before a trial may be stopped"})


@dataclass
class L2OConfig:
    """Meta-training of the learned optimizer (``raysub l2o meta-train``): φ's shape and the meta-loop (SL2O
    Algorithm 1). The optimizee task is the ``train`` section (projection, dim, basis_run, batch size)."""

    hidden_size: int = field(default=20, metadata={"help": "LSTM hidden units per coordinate (SL2O code: 8–20)"})
    features: List[str] = field(default_factory=lambda: ["m", "g"], metadata={"help": "per-coordinate inputs"})
    step_scale: float = field(default=1.0, metadata={"help": "largest |Δz_i| of one learned step"})
    meta_lr: float = field(default=1e-2, metadata={"help": "Adam lr of φ (SL2O: 1e-2)"})
    unroll: int = field(default=10, metadata={"help": "T: steps per truncated unroll (SL2O: 10)"})
    steps: int = field(default=1000, metadata={"help": "N: steps of one optimizee before it is replaced (SL2O: 1000)"})
    optimizees: int = field(default=4, metadata={"help": "optimizees in flight, spread over the actors"})
    actors: int = field(default=2, metadata={"help": "Ray actors owning the optimizees"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "logical CPUs each actor reserves"})
    meta_steps: int = field(default=500, metadata={"help": "meta-steps (φ updates) of the whole meta-training"})
    validate_every: int = field(default=50, metadata={"help": "k: meta-validate every k meta-steps"})
    validation_optimizees: int = field(default=2, metadata={"help": "fresh optimizees per meta-validation"})
    z0_std: float = field(default=0.0, metadata={"help": "σ of the random start z0 ~ N(0, σ²) (0: z0 = 0)"})
    grad_clip: float = field(default=1.0, metadata={"help": "global-norm clip of the averaged meta-gradient"})
    init: str = field(default="adam_like", metadata={"help": "φ's start: adam_like (tanh-clipped Adam) | random"})
    meta_loss: str = field(default="sum", metadata={
        "help": "meta-loss of an unroll: sum (Σ L_t, SL2O) | log (Σ log L_t: late progress weighs as much as early)"})
    select_tolerance: float = field(default=0.005, metadata={
        "help": "best φ: the fastest (mean convergence step) of those within this val accuracy of the best"})
    init_gain: float = field(default=1.0, metadata={
        "help": "adam_like: Δz ≈ −step_scale·tanh(init_gain·m̂/√v̂), i.e. Adam with lr step_scale·init_gain"})
    seed: int = field(default=0, metadata={"help": "φ's init, optimizee seeds and z0's"})


@dataclass
class L2OTuneConfig:
    """Ray Tune over the ``l2o`` meta-hyperparameters (``raysub l2o tune``): seeded random search over ``space``,
    ASHA on the meta-validation convergence step; each trial is a meta-training run (checks: raysub.l2o.tune)."""

    space: Dict[str, Any] = field(
        default_factory=lambda: {"hidden_size": [8, 20], "meta_lr": [0.003, 0.01, 0.03], "unroll": [5, 10, 20]},
        metadata={"help": "l2o key -> list of choices; keys: hidden_size, meta_lr, unroll, step_scale, optimizees, "
                          "features (e.g. {features: [[m, g], [m]]})"})
    samples: int = field(default=8, metadata={"help": "trials: distinct points drawn at random from the space"})
    max_concurrent_trials: Optional[int] = field(
        default=None, metadata={"help": "trials at once (default: as many as the cluster's CPUs fit)"})
    asha: bool = field(default=True, metadata={"help": "ASHA early stopping on the convergence step"})
    grace_period: int = field(default=1, metadata={"help": "ASHA: meta-validations before a trial may be stopped"})
    reduction_factor: int = field(default=2, metadata={"help": "ASHA: keep 1 in this many trials at each rung"})
    seed: int = field(default=0, metadata={"help": "which points of the space are drawn"})


@dataclass
class TrackingConfig:
    """Live curves of every stage through Ray's logger integrations (raysub.tracking): TensorBoard event files under
    the run directory, and MLflow runs when asked. Nothing here changes results."""

    tensorboard: bool = field(default=True, metadata={
        "help": "event files of the Ray Train stages and meta-training under RUN/tensorboard/ (Tune trials always "
                "write theirs, under RUN/tune/)"})
    mlflow: bool = field(default=False, metadata={
        "help": "also log every stage to MLflow with Ray's MLflowLoggerCallback (pip install 'raysub[tracking]')"})
    mlflow_tracking_uri: Optional[str] = field(default=None, metadata={
        "help": "MLflow tracking URI (default: a file store in RUN/mlruns; needed when run_dir is on object storage)"})
    mlflow_experiment: Optional[str] = field(default=None, metadata={
        "help": "MLflow experiment (default: the run directory's name)"})


@dataclass
class Config:
    run_dir: str = field(default="runs/quickstart", metadata={"help": "local path or pyarrow.fs URI"})
    seed: int = field(default=0, metadata={"help": "seeds theta0, and data order and augmentation (train.data_seed for a subspace run)"})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    sgd: SGDConfig = field(default_factory=SGDConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    basis: BasisConfig = field(default_factory=BasisConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    l2o: L2OConfig = field(default_factory=L2OConfig)
    l2o_tune: L2OTuneConfig = field(default_factory=L2OTuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    # -- conversion -------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Config":
        """Build and type-check a config. Raises ConfigError listing every problem."""
        problems: List[str] = []
        cfg = _build(cls, data or {}, "", problems)
        if problems:
            raise ConfigError(problems)
        return cfg

    def to_yaml(self, header: str = "") -> str:
        """The config as YAML that `load_yaml` reads back unchanged (a string such as '1e-3' is quoted)."""
        return header + yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)

    # -- derived values ---------------------------------------------------------------------------------
    @property
    def train_dim(self) -> int:
        return self.train.dim if self.train.dim is not None else self.basis.dim

    @property
    def train_label(self) -> str:
        return self.train.label or self.train.optimizer

    @property
    def train_data_seed(self) -> int:
        """The subspace run's data order (``train.data_seed``, default ``seed``)."""
        return self.seed if self.train.data_seed is None else self.train.data_seed


# ---------------------------------------------------------------------------------------------------------
# YAML: raysub reads YAML with `load_yaml` (configs with `_parse`, which keeps numbers' spelling)

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


# ---------------------------------------------------------------------------------------------------------
# building from plain data with type checks

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value, tp, key: str, problems: List[str]):
    """Check `value` against the annotation `tp`; ints are accepted for floats, floats must be finite (every
    float of the schema is a rate, a fraction or a size), ints must fit 64 bits, strings `MAX_TEXT` characters
    (also inside free-form mappings), and a string field given a number keeps its spelling. Returns the value,
    with plain numbers."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, problems)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {_show(value)}")
            return value
        return [_coerce(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {_show(value)}")
        elif any(not isinstance(k, str) for k in value):  # option names (checkers sort them): `1:` or `true:`
            bad = next(k for k in value if not isinstance(k, str))
            problems.append(f"{key}: the key {_show(_plain(bad))} is not a name: quote it, or give names as keys")
        _free_form_problems(value, key, problems)
        return _plain(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {_show(value)}")
            return value
        if not math.isfinite(value):
            problems.append(f"{key}: expected a finite number, got {float(value)}")
        return float(value)
    if tp is int:
        seed = SEEDS.get(re.sub(r"\[\d+\]$", "", key))
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {_show(value)}")
        elif seed is not None and not 0 <= value < seed[0]:
            problems.append(f"{key}={_show(_plain(value))}: a seed must be an integer in [0, {seed[1]}) ({seed[2]})")
        else:
            _free_form_problems(value, key, problems)
        return _plain(value)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true or false, got {_show(value)}")
        return value
    if tp is str:
        if isinstance(value, _Spelled):
            value = value.text
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {_show(value)}")
        elif len(value) > MAX_NAME and re.sub(r"\[\d+\]$", "", key) not in TEXT_KEYS:
            problems.append(f"{key}: a name of {len(value):,} characters ({_show(value)}): at most {MAX_NAME}")
        else:
            _free_form_problems(value, key, problems)
        return value
    if tp is typing.Any:
        _free_form_problems(value, key, problems)
        return value
    raise AssertionError(f"unsupported config annotation {tp}")


# Every seed's range, checked with its type (a seed out of range is refused, never wrapped or overflowed later).
# A run's seeds reach torch.manual_seed and torch.Generator.manual_seed, numpy's SeedSequence (projections) and
# random.Random (Tune): below 2**32 they are valid for each, distinct seeds stay distinct (the projections keep a
# seed's low 32 bits) and the epoch seeds derived from them (seed·100,003 + epoch) fit torch's 64-bit seeds.
# l2o.seed is multiplied twice (optimizee seed l2o.seed·1,000,003 + serial, then its epoch seeds ·100,003).
_RUN_SEED = (2 ** 32, "2**32", "what numpy, torch and the projections all accept as distinct seeds")
SEEDS = {
    "seed": _RUN_SEED, "data.label_noise_seed": _RUN_SEED, "data.val_seed": _RUN_SEED, "train.data_seed": _RUN_SEED,
    "sweep.seeds": _RUN_SEED, "l2o_tune.seed": _RUN_SEED,
    "l2o.seed": (10 ** 8, "10**8", "its optimizees' epoch seeds, l2o.seed·1,000,003·100,003, must fit 64 bits"),
}


# The string fields that hold paths, URIs or free text (`MAX_TEXT`); every other one names a registered plug-in, a
# choice or a label (`MAX_NAME`), so no message echoing it is longer than a line. train.label has its own check.
TEXT_KEYS = {"run_dir", "data.root", "cluster.address", "train.basis_run", "train.init_from", "train.label",
             "tracking.mlflow_tracking_uri", "tracking.mlflow_experiment"}


def _free_form_problems(value, key: str, problems: List[str]) -> None:
    """Append a problem for every integer in ``value`` (at any depth) that does not fit 64 bits and every string
    longer than `MAX_TEXT`: options reach torch, numpy and messages, where they would crash or flood."""
    if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        problems.append(f"{key}={_show(_plain(value))}: out of range: an integer here must fit 64 bits "
                        f"(-2**63 ≤ value < 2**63)")
    elif isinstance(value, str) and len(value) > MAX_TEXT:
        problems.append(f"{key}: a string of {len(value):,} characters ({_show(value)}): at most {MAX_TEXT:,}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _free_form_problems(k, f"{key} (a key)", problems)
            _free_form_problems(v, f"{key}.{k}" if isinstance(k, str) and len(k) <= SHOWN else key, problems)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _free_form_problems(v, f"{key}[{i}]", problems)


def _build(cls, data, prefix: str, problems: List[str]):
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_show(data)}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            problems.append(f"unknown key {_show(f'{prefix}{key}')}: known keys here are {', '.join(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], f"{prefix}{f.name}.", problems)
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, prefix + f.name, problems)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# files and overrides

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
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
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
        from raysub.storage import redact

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
    from raysub.storage import RunDir, split_uri

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
            from raysub.storage import open_uri  # its credentials adopted, S3 timeouts set

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


# ---------------------------------------------------------------------------------------------------------
# the schema's own value checks (each package checks its own section: see raysub.pipeline.plan)

# A name that becomes a path component of the run directory (train.label: train/LABEL.pt, curves/LABEL.json,
# checkpoints/train-LABEL): no '/', no '..', no hidden file, nothing a shell or object store reads specially.
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def positive(problems: List[str], key: str, value, allow_zero: bool = False) -> None:
    """Append ``key=value: must be > 0`` (``≥ 0`` with ``allow_zero``) unless ``value`` is a finite number that
    is (NaN and ±inf never are); None passes."""
    if value is None:
        return
    bound = "≥ 0" if allow_zero else "> 0"
    if not math.isfinite(value):
        problems.append(f"{key}={value}: must be a finite number {bound}")
    elif value < 0 or (value == 0 and not allow_zero):
        problems.append(f"{key}={value}: must be {bound}")


def schema_problems(cfg: Config) -> List[str]:
    """Value ranges of the schema's own numbers (registry names, options, data and sampling are checked by
    their packages). Empty list: fine."""
    problems: List[str] = []
    for key, value in (
        ("cluster.num_workers", cfg.cluster.num_workers),
        ("cluster.cpus_per_worker", cfg.cluster.cpus_per_worker),
        ("sgd.epochs", cfg.sgd.epochs),
        ("sgd.lr", cfg.sgd.lr),
        ("sample.epochs", cfg.sample.epochs),
        ("sample.snapshots_per_epoch", cfg.sample.snapshots_per_epoch),
        ("basis.dim", cfg.basis.dim),
        ("train.dim", cfg.train.dim),
        ("train.epochs", cfg.train.epochs),
        ("train.lr", cfg.train.lr),
        ("train.batch_size", cfg.train.batch_size),
        ("cluster.num_cpus", cfg.cluster.num_cpus),
    ):
        positive(problems, key, value)
    for key, milestones in (("sgd.lr_milestones", cfg.sgd.lr_milestones),
                            ("train.lr_milestones", cfg.train.lr_milestones)):
        if any(m < 0 for m in milestones):
            problems.append(f"{key}={_show(milestones)}: epochs are ≥ 0")
    if cfg.train.label is not None and not SAFE_NAME.fullmatch(cfg.train.label):
        problems.append(f"train.label={_show(cfg.train.label)}: a label names files of the run (train/LABEL.pt, "
                        f"curves/LABEL.json): use letters, digits, '.', '_' and '-', not first '.', at most 100")
    for key, value in (
        ("cluster.max_failures", cfg.cluster.max_failures),
        ("sgd.momentum", cfg.sgd.momentum),
        ("sgd.weight_decay", cfg.sgd.weight_decay),
        ("sample.snapshot_every_steps", cfg.sample.snapshot_every_steps),
        ("train.momentum", cfg.train.momentum),
        ("train.weight_decay", cfg.train.weight_decay),
    ):
        positive(problems, key, value, allow_zero=True)
    for key, value in (("sgd.momentum", cfg.sgd.momentum), ("train.momentum", cfg.train.momentum)):
        if value >= 1:
            problems.append(f"{key}={value}: must be < 1")
    for key, value in (("sgd.lr_gamma", cfg.sgd.lr_gamma), ("train.lr_gamma", cfg.train.lr_gamma)):
        if not 0 < value <= 1:
            problems.append(f"{key}={value}: must be in (0, 1]")
    if cfg.sample.epochs > cfg.sgd.epochs:
        problems.append(
            f"sample.epochs={cfg.sample.epochs} exceeds sgd.epochs={cfg.sgd.epochs}: "
            "the snapshot window is part of the SGD run; raise sgd.epochs or lower sample.epochs"
        )
    if cfg.sgd.optimizer not in ("sgd", "adamw"):
        problems.append(f"sgd.optimizer={_show(cfg.sgd.optimizer)}: choose sgd or adamw")
    if cfg.basis.gram not in ("auto", "posthoc"):
        problems.append(f"basis.gram={_show(cfg.basis.gram)}: choose auto or posthoc")
    if cfg.train.basis_dtype not in ("float32", "bfloat16"):
        problems.append(f"train.basis_dtype={_show(cfg.train.basis_dtype)}: choose float32 or bfloat16")
    from raysub.tracking import tracking_problems  # MLflow installed, and a store it can reach

    problems += tracking_problems(cfg)
    return problems
