"""The run configuration's schema: one dataclass per section, each field's default and help, and `Config`, the
whole. A field typed ``Literal[...]`` takes one of its choices (`raysub.config.checks` refuses the rest as it
builds a config). `to_dict`/`from_dict` carry a config through Ray; `to_yaml` writes what `load_yaml` reads back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

import yaml

from raysub.config.checks import build
from raysub.config.yamlio import _Dumper
from raysub.errors import ConfigError


@dataclass
class DataConfig:
    name: str = field(default="digits", metadata={"help": "registered dataset name"})
    root: Optional[str] = field(default=None, metadata={"help": "dataset directory (default per dataset)"})
    batch_size: int = field(default=64, metadata={"help": "global training batch, split evenly over workers"})
    eval_batch_size: int = field(default=1024, metadata={"help": "global evaluation batch"})
    augment: bool = field(default=True, metadata={"help": "training augmentation where the dataset has one"})
    num_workers: int = field(default=0, metadata={"help": "data-loading processes per Ray worker (ImageNet)"})
    image_size: Optional[int] = field(default=None, metadata={"help": "ImageNet crop size (default 224)"})
    ingest: str = field(default="auto", metadata={
        "help": "ImageNet: dataloader (local folder), ray_data (Ray Data decodes on the cluster's CPUs), auto "
                "(ray_data for an s3://, gs:// root)"})
    bad_images: str = field(default="stop", metadata={
        "help": "ImageNet: an unreadable image stops the run (stop) or is left out, with a line (skip; ray_data)"})
    partial_val: bool = field(default=False, metadata={"help": "ImageNet: accept a val/ lacking some classes"})
    preprocess_cpus: float = field(default=1.0, metadata={"help": "ImageNet ray_data: CPUs per decode task"})
    preprocess_labels: Dict[str, str] = field(default_factory=dict, metadata={
        "help": "ImageNet ray_data: node labels the decode tasks run on (e.g. CPU-only nodes)"})
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
    num_workers: int = field(default=2, metadata={
        "help": "Ray Train workers (DDP ranks); 0: Ray Train's local mode, the loop runs in this process as one rank "
                "(for debugging: breakpoints work; no checkpoints are kept, so --resume restarts an interrupted stage, "
                "and no tracking)"})
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
    optimizer: Literal["sgd", "adamw"] = field(default="sgd", metadata={
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
    stop: Literal["fixed", "adaptive"] = field(default="fixed", metadata={
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
    gram: Literal["auto", "posthoc"] = field(default="auto", metadata={
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
    basis_dtype: Literal["float32", "bfloat16"] = field(
        default="float32", metadata={"help": "storage of P on the device: float32|bfloat16"})
    projection_sharding: Literal["auto", "replicated", "sharded", "node"] = field(default="auto", metadata={
        "help": "where a stored P (dldr, dense) lives: replicated (every worker holds P), sharded (each worker holds "
                "the rows of its slice of the parameters), node (sharded within a node, replicated across nodes: "
                "only d+1 floats cross nodes), auto (replicated when it fits train.projection_budget_gb, else sharded "
                "or node)"})
    projection_budget_gb: Optional[float] = field(default=None, metadata={
        "help": "memory a worker may spend on P (GB); default: 80% of the driver machine's memory over the workers "
                "on it (on GPUs: half of the driver's GPU)"})
    projection_groups: Optional[int] = field(default=None, metadata={
        "help": "node sharding: this many groups of consecutive ranks instead of Ray's nodes (a test's nodes on one "
                "machine)"})
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
    rule: str = field(default="lstm", metadata={
        "help": "φ's step: lstm (SL2O: step_scale·tanh(w_outᵀh)) | adam_schedule (a learned multiplier on Adam's "
                "step, Celo-Adam style: exactly Adam at l2o.adam_lr when it starts)"})
    adam_lr: float = field(default=0.1, metadata={"help": "adam_schedule: the lr of the Adam step (tuned Adam†'s)"})
    per_coordinate: bool = field(default=True, metadata={
        "help": "adam_schedule: a multiplier per coordinate (false: one per step, their mean)"})
    horizons: List[int] = field(default_factory=list, metadata={
        "help": "[lo, hi]: each optimizee's horizon drawn log-uniformly from it (whole unrolls); empty: l2o.steps"})
    estimator: str = field(default="tbptt", metadata={
        "help": "meta-gradient: tbptt (truncated backprop through each unroll, SL2O) | pes (persistent evolution "
                "strategies, Vicol et al. 2021: unbiased over the whole horizon; antithetic pairs of optimizees)"})
    pes_sigma: float = field(default=0.01, metadata={"help": "pes: std of φ's perturbation"})
    select_by: str = field(default="speed", metadata={
        "help": "best φ among those within select_tolerance of the best val acc: speed (fastest convergence step) | "
                "final_loss (lowest smoothed training loss at the end of the validation runs)"})
    validation_steps: Optional[int] = field(default=None, metadata={
        "help": "steps of a meta-validation run (default l2o.steps): select φ at the horizon it must win at"})
    late_weight: float = field(default=0.0, metadata={
        "help": "meta-loss term t weighted ∝ 1 + late_weight·(fraction of its optimizee's horizon done): late "
                "training counts more (0: every term alike)"})


@dataclass
class L2OTuneConfig:
    """Ray Tune over the ``l2o`` meta-hyperparameters (``raysub l2o tune``): seeded random search over ``space``,
    ASHA on the meta-validation convergence step; each trial is a meta-training run (checks: raysub.l2o.tune)."""

    space: Dict[str, Any] = field(
        default_factory=lambda: {"hidden_size": [8, 20], "meta_lr": [0.003, 0.01, 0.03], "unroll": [5, 10, 20]},
        metadata={"help": "l2o key -> list of choices; keys: rule, estimator, hidden_size, meta_lr, unroll, "
                          "step_scale, optimizees, features (e.g. {features: [[m, g], [m]]}), horizons, late_weight, "
                          "meta_loss, adam_lr"})
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
        cfg = build(cls, data or {}, "", problems)
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
    def ranks(self) -> int:
        """The ranks a stage trains on: ``cluster.num_workers``, and 1 in local mode (0 workers)."""
        return max(1, self.cluster.num_workers)

    @property
    def local_mode(self) -> bool:
        """``cluster.num_workers=0``: Ray Train's local mode, the loop in the driver's process."""
        return self.cluster.num_workers == 0

    @property
    def train_label(self) -> str:
        return self.train.label or self.train.optimizer

    @property
    def train_data_seed(self) -> int:
        """The subspace run's data order (``train.data_seed``, default ``seed``)."""
        return self.seed if self.train.data_seed is None else self.train.data_seed
