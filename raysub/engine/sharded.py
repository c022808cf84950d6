"""The projection sharded across workers by parameter rows (``train.projection_sharding``).

Replicated (today's default for small P): every worker holds P (N×D), projects its own gradient, g̃_r = Pᵀ g_r,
and the D+1 floats (g̃ and the loss) are all-reduced; θ = θ0 + P z is formed locally.

Sharded, over a group of G ranks (the whole world; or, in ``node`` mode, the ranks of one node): rank i of the
group holds only the rows P_i of its slice [a_i, b_i) of the flat parameters (`raysub.storage.block_bounds`:
the slices the sampling ranks stored the trajectory and the basis in). One step:

1. local forward and backward → the flat gradient g_r;
2. **reduce-scatter** over the group: rank i receives (Σ_{r∈group} g_r)[a_i:b_i];
3. P_iᵀ of that slice: D floats, a *partial* projection — summed over every rank of the world it is
   Pᵀ Σ_r g_r, because the slices of a group tile the parameters and the groups tile the ranks;
4. the step's usual all-reduce of D+1 floats (`raysub.engine.task.train_step`) sums the partials and the losses
   over the world and divides by W: the mean projected gradient, as replicated;
5. the optimizer steps z, identically on every rank; θ_i = θ0_i + P_i z on the own slice, then **all-gather**
   over the group gives every rank the whole θ for the next forward.

In ``node`` mode the reduce-scatter and the all-gather stay inside a node and only the D+1 floats cross nodes.
Collectives are ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` (NCCL on GPUs, and gloo, which has both
in torch ≥ 2.6) over equal chunks of ⌈N/G⌉ floats: the slices, which differ by at most one row, are padded into a
scratch buffer (no copy when G divides N and the slices are equal).

Every optimizer works unchanged: it sees z, g̃ and the loss; a closure's re-evaluation goes through the same
``affine_`` (all-gather) and ``project`` (reduce-scatter). Checkpoints hold z and the optimizer state, which are
replicated.

Shape suffixes (`raysub.engine.flat`'s legend): ``_N`` the flat parameters, ``_D`` the subspace coordinates,
``_C`` one chunk (⌈N/G⌉ floats), ``_GC`` the padded G×C scratch.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from raysub.projections.base import MatrixProjection, Projection
from raysub.storage import block_bounds

MODES = ("replicated", "sharded", "node")
DEFAULT_HOST_FRACTION = 0.8  # of the driver machine's memory, over the workers on it
DEFAULT_GPU_FRACTION = 0.5  # of the driver's GPU (activations, the model and its gradient need the rest)


# ---------------------------------------------------------------------------------------------------------
# the choice (pure functions: the driver plans with them, every rank agrees on them)

def per_worker_bytes(mode: str, p_bytes: int, world: int, node_size: int) -> int:
    """Bytes of P one worker holds: all of it replicated, its slice's rows sharded over the world (``sharded``) or
    over its node (``node``): the largest slice, ⌈N/G⌉ rows."""
    group = {"replicated": 1, "sharded": world, "node": node_size}[mode]
    return -(-p_bytes // max(group, 1))


def resolve_mode(requested: str, p_bytes: int, budget: int, world: int, node_size: int, nodes: int) -> str:
    """The mode a training runs in: ``requested`` unless ``auto``, or a family holding no N×D matrix (p_bytes 0:
    replicated, nothing to shard). ``auto``: replicated when P fits the per-worker ``budget``, else ``node`` on
    several nodes when a node's share fits (only D+1 floats then cross nodes), else ``sharded``."""
    if p_bytes == 0 or world == 1:
        return "replicated"
    if requested != "auto":
        return requested
    if p_bytes <= budget:
        return "replicated"
    if nodes > 1 and per_worker_bytes("node", p_bytes, world, node_size) <= budget:
        return "node"
    return "sharded"


def host_memory_bytes() -> int:
    """Physical memory of this machine (sysconf)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget_bytes(use_gpu: bool, workers_here: int) -> Tuple[int, str]:
    """(bytes, how it was chosen): half the driver's GPU with ``use_gpu`` when the driver sees one, else
    `DEFAULT_HOST_FRACTION` of the driver machine's memory over the ``workers_here`` workers sharing it."""
    if use_gpu and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        return int(DEFAULT_GPU_FRACTION * total), f"half of this machine's {total / 1e9:.1f} GB GPU"
    total = host_memory_bytes()
    return (int(DEFAULT_HOST_FRACTION * total / max(workers_here, 1)),
            f"{DEFAULT_HOST_FRACTION:.0%} of this machine's {total / 1e9:.1f} GB over {workers_here} workers")


# ---------------------------------------------------------------------------------------------------------
# the groups and slices of one rank

@dataclass(frozen=True)
class ShardLayout:
    """Where rank ``world_ranks[index]`` sits: its group (``world_ranks``, in order) and the group's slices."""

    mode: str
    world_ranks: Tuple[int, ...]
    index: int
    bounds: Tuple[Tuple[int, int], ...]

    @property
    def size(self) -> int:
        return len(self.world_ranks)

    @property
    def rows(self) -> Tuple[int, int]:
        return self.bounds[self.index]

    @property
    def chunk(self) -> int:
        return max(b - a for a, b in self.bounds)


def consecutive_groups(world: int, count: int) -> List[List[int]]:
    """``count`` groups of consecutive ranks (``train.projection_groups``: a test's nodes on one machine)."""
    if count <= 0 or world % count:
        raise ValueError(f"{count} groups do not divide {world} ranks")
    size = world // count
    return [list(range(g * size, (g + 1) * size)) for g in range(count)]


def groups_by_node(node_ids: Sequence[str]) -> List[List[int]]:
    """The ranks of each node (``node_ids[r]`` is rank r's node), nodes in order of their first rank."""
    order: List[str] = []
    for n in node_ids:
        if n not in order:
            order.append(n)
    return [[r for r, n in enumerate(node_ids) if n == node] for node in order]


def layout_for(mode: str, num_params: int, rank: int, groups: Sequence[Sequence[int]]) -> ShardLayout:
    """Rank ``rank``'s layout: its group among ``groups`` (one group of every rank for ``sharded``) and that
    group's slices of the ``num_params`` parameters."""
    mine = next(g for g in groups if rank in g)
    return ShardLayout(mode, tuple(mine), list(mine).index(rank), block_bounds(num_params, len(mine)))


def node_id() -> str:
    """This process's node: Ray's node ID inside a Ray worker, else the host name."""
    try:
        import ray  # heavy: only a worker that shards by node asks

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # not a Ray process
        pass
    return socket.gethostname()


def world_groups(mode: str, world: int, declared: Optional[int]) -> List[List[int]]:
    """The groups of ``mode`` over the current process group — collective for ``node`` mode without ``declared``
    groups (every rank gathers every rank's node ID), so every rank must call it."""
    if mode == "sharded":
        return [list(range(world))]
    if declared:
        return consecutive_groups(world, declared)
    ids: List[Optional[str]] = [None] * world
    dist.all_gather_object(ids, node_id())
    return groups_by_node([str(i) for i in ids])


# ---------------------------------------------------------------------------------------------------------
# the collectives and the projection

class GroupComm:
    """Reduce-scatter and all-gather of the flat parameters' slices over one group, counting the floats each rank
    sends into ``floats`` (what a chunked ring moves: (G−1)/G of the padded vector per collective)."""

    def __init__(self, layout: ShardLayout, group=None):
        self.layout = layout
        self.group = group  # a torch.distributed group; None: the default (world) group
        self.floats = 0
        self._buffers: Dict[Tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def _buffer(self, name: str, size: int, like: torch.Tensor) -> torch.Tensor:
        """A scratch buffer kept across steps (zeroed once: padding rows stay zero), so a step allocates nothing
        of the parameters' size."""
        key = (name, like.dtype, like.device)
        if key not in self._buffers:
            self._buffers[key] = torch.zeros(size, dtype=like.dtype, device=like.device)
        return self._buffers[key]

    def _padded(self, like: torch.Tensor) -> torch.Tensor:
        return self._buffer("padded", self.layout.size * self.layout.chunk, like)

    def _even(self, n: int) -> bool:
        return self.layout.size * self.layout.chunk == n

    def reduce_scatter(self, flat_N: torch.Tensor) -> torch.Tensor:
        """(Σ over the group of ``flat_N``)[own slice]."""
        lay = self.layout
        c = lay.chunk
        if self._even(flat_N.numel()):
            src = flat_N.contiguous()
        else:
            src = self._padded(flat_N)
            for j, (a, b) in enumerate(lay.bounds):
                src[j * c : j * c + (b - a)] = flat_N[a:b]
        out_C = self._buffer("scattered", c, flat_N)
        dist.reduce_scatter_tensor(out_C, src, group=self.group)
        self.floats += (lay.size - 1) * c
        a, b = lay.rows
        return out_C[: b - a]

    def all_gather_(self, own: torch.Tensor, out_N: torch.Tensor) -> torch.Tensor:
        """``out`` ← every rank's own slice, each in its place."""
        lay = self.layout
        c = lay.chunk
        if own.numel() == c and own.is_contiguous():  # an equal slice: sent as it is
            mine_C = own
        else:
            mine_C = self._buffer("mine", c, out_N)  # the padding past a short slice stays zero
            mine_C[: own.numel()] = own
        if self._even(out_N.numel()):
            dist.all_gather_into_tensor(out_N, mine_C, group=self.group)
        else:
            dst = self._padded(out_N)
            dist.all_gather_into_tensor(dst, mine_C, group=self.group)
            for j, (a, b) in enumerate(lay.bounds):
                out_N[a:b] = dst[j * c : j * c + (b - a)]
        self.floats += (lay.size - 1) * c
        return out_N


class ShardedProjection(Projection):
    """P held as the rows of one slice (``rows``: a `MatrixProjection` of D × (b−a)); the others live on the other
    ranks of the group. ``project`` returns this rank's *partial* Pᵀ g (see the module docstring): callers sum it
    over the world, as they sum the replicated projections of the ranks' gradients."""

    def __init__(self, rows: MatrixProjection, num_params: int, comm: GroupComm):
        a, b = comm.layout.rows
        assert rows.num_params == b - a, f"rows of {rows.num_params} parameters for the slice [{a}, {b})"
        self.rows, self.comm = rows, comm
        self.dim, self.num_params, self.seed = rows.dim, num_params, rows.seed
        self._own: Optional[torch.Tensor] = None

    @property
    def layout(self) -> ShardLayout:
        return self.comm.layout

    def held_bytes(self) -> int:
        return self.rows.basis_DN.numel() * self.rows.basis_DN.element_size()

    def lift(self, z_D: torch.Tensor) -> torch.Tensor:
        out_N = torch.empty(self.num_params, dtype=z_D.dtype, device=z_D.device)
        return self.comm.all_gather_(self.rows.lift(z_D), out_N)

    def project(self, g_N: torch.Tensor) -> torch.Tensor:
        return self.rows.project(self.comm.reduce_scatter(g_N))

    def lift_add_(self, z_D: torch.Tensor, out_N: torch.Tensor) -> torch.Tensor:
        return out_N.add_(self.lift(z_D).to(out_N.dtype))

    def affine_(self, z_D: torch.Tensor, base_N: torch.Tensor, out_N: torch.Tensor) -> torch.Tensor:
        a, b = self.layout.rows
        if self._own is None or self._own.dtype != out_N.dtype or self._own.device != out_N.device:
            self._own = torch.empty(b - a, dtype=out_N.dtype, device=out_N.device)  # kept: one slice, reused
        own = self.rows.affine_(z_D, base_N[a:b], self._own)
        return self.comm.all_gather_(own, out_N)


def held_bytes(projection: Projection) -> int:
    """Bytes of P this worker holds (0 for a family without a stored matrix)."""
    if isinstance(projection, ShardedProjection):
        return projection.held_bytes()
    if isinstance(projection, MatrixProjection):
        return projection.basis_DN.numel() * projection.basis_DN.element_size()
    return 0


def mode_of(projection: Projection) -> str:
    """The sharding a built projection runs in: its layout's mode, else replicated."""
    return projection.layout.mode if isinstance(projection, ShardedProjection) else "replicated"


def group_floats(projection: Projection) -> int:
    """Floats this worker sent in the sharded collectives so far (0 replicated)."""
    return projection.comm.floats if isinstance(projection, ShardedProjection) else 0


def budget_bytes(cfg, workers_here: int) -> Tuple[int, str]:
    """The per-worker budget for P: ``train.projection_budget_gb``, else `default_budget_bytes`."""
    if cfg.train.projection_budget_gb is not None:
        return int(cfg.train.projection_budget_gb * 1e9), "train.projection_budget_gb"
    return default_budget_bytes(cfg.cluster.use_gpu, workers_here)


def agreed_auto(cfg, p_bytes: int) -> str:
    """``auto`` resolved inside the workers (when no driver planned it): rank 0 resolves it with its machine's
    budget and broadcasts the choice, so every rank builds the same layout. Collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return "replicated"
    world = dist.get_world_size()
    groups = cfg.train.projection_groups
    choice = [resolve_mode("auto", p_bytes, budget_bytes(cfg, world)[0], world, world // (groups or 1), groups or 1)]
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def setup(mode: str, num_params: int, declared_groups: Optional[int], keep_single: bool = False
          ) -> Optional[GroupComm]:
    """This rank's `GroupComm` for ``mode`` in the current process group (None: replicated or one rank; with
    ``keep_single`` a group of one still gets one, so its collectives run — a one-GPU check of the NCCL path).
    Collective: every rank calls it, in the same order (``dist.new_group`` for each node group)."""
    if mode == "replicated" or not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size() == 1 and not keep_single:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = world_groups(mode, world, declared_groups)
    handle = None
    if len(groups) > 1 or len(groups[0]) != world:
        for g in groups:  # every rank creates every group, in the same order (torch.distributed's rule)
            pg = dist.new_group(g)
            if rank in g:
                handle = pg
    layout = layout_for(mode, num_params, rank, groups)
    if layout.size == 1 and not keep_single:  # a node with one worker: it holds its P whole
        return None
    return GroupComm(layout, handle)
