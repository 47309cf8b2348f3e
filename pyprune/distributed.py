"""Multi-process pruning on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), launched by ``torchrun``.

Two things are split over the ranks of a process group, block by block (docs/ALGORITHM.md section 5):

1. Calibration (data parallel): every rank runs its own shard of the calibration samples (``shard_samples``) through
   the current block and accumulates the Hessians of its linear layers from them; ``Comm.reduce_hessian`` then sums
   ``n_r H_r`` and ``n_r`` over the ranks, so every rank holds ``H = 2/N sum X^T X`` of all ``N`` tokens: the
   single-process ``H`` up to float rounding.
2. Solves, group by group (the modules reading one Hessian, ``solve_group``): the group's modules, and row ranges
   of a big module (rows are independent given ``H`` and the mask rule, so a row-split solve equals the unsplit one
   where ``row_split_exact`` says so), are work units assigned to ranks by ``plan_units``; each rank prunes its
   units with one ``pyprune.algorithms.prune_group`` call (the group's shared Hessian setup, one damped factor, as in
   a single process) and the owners broadcast the pruned rows, masks and per-unit loss/damping/exchanges/fallback,
   so every rank ends the block with identical weights, identical reports, and (from them) identical outputs for
   its own samples. The driver (``models.driver``) calls ``solve_group`` where a single process calls
   ``prune_group``.

Running (every rank loads, or with ``--stream`` reads block by block, the model; rank 0 alone writes the output):

    one node, 8 GPUs:   torchrun --standalone --nproc-per-node 8 -m pyprune prune MODEL --sparsity 2:4 -o OUT
    2 nodes x 8 GPUs:   on each node: torchrun --nnodes 2 --node-rank {0|1} --nproc-per-node 8 \
                            --master-addr HOST_OF_NODE_0 --master-port 29500 -m pyprune prune MODEL ... -o OUT
    CPU processes:      torchrun --standalone --nproc-per-node 2 -m pyprune prune MODEL --device cpu --threads 1 ...

``--distributed`` is implied when WORLD_SIZE > 1. A killed streamed run resumes (same command, same world size);
its per-rank activations live in OUT/.pyprune-partial, which must be on a file system that every rank can read.

No global state: a ``Comm`` is built once (``init_from_env``) and passed explicitly (``prune_model(..., comm=comm)``).
With ``comm=None`` the driver runs exactly as a single process.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch

__all__ = ["Comm", "Unit", "UnitStats", "init_from_env", "shard_samples", "plan_units", "row_split_exact", "prune_rows",
           "solve_group", "prune_units", "env_world_size"]


@dataclass(frozen=True)
class Comm:
    """One rank's view of the process group: ``rank``/``world_size`` in ``group``, and the ``device`` on which it
    computes (collectives run there: CUDA tensors for NCCL, CPU tensors for gloo). ``split_rows``: allow splitting a
    big module into row ranges on several ranks (only done where the result is unchanged, see ``row_split_exact``)."""

    rank: int
    world_size: int
    device: torch.device
    group: Any = None
    split_rows: bool = True
    min_split_rows: int = 64

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (thin wrappers so the callers never touch torch.distributed directly)
    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        import torch.distributed as dist
        dist.broadcast(t, src=self._global(src), group=self.group)
        return t

    def broadcast_object(self, obj, src: int = 0):
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=self._global(src), group=self.group,
                                   device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def all_gather_object(self, obj) -> list:
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def on_main(self, fn):
        """Run ``fn()`` on rank 0 alone and hand its result (or its exception, raised on every rank) to all ranks,
        so a failure of rank 0 (e.g. an output directory it refuses) ends every rank instead of hanging them."""
        box = None
        if self.is_main:
            try:
                box = (True, fn())
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                box = (False, e)
        ok, value = self.broadcast_object(box)
        if not ok:
            raise value
        return value

    def barrier(self) -> None:
        import torch.distributed as dist
        if self.device.type == "cuda":
            dist.barrier(group=self.group, device_ids=[self.device.index or 0])
        else:
            dist.barrier(group=self.group)

    def sum_int(self, value: int) -> int:
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        return int(self.all_reduce_(t).item())

    def _global(self, rank: int) -> int:
        if self.group is None:
            return rank
        import torch.distributed as dist
        return dist.get_global_rank(self.group, rank)

    # -- Hessians
    def reduce_hessian(self, H: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
        """The token-weighted mean over ranks of per-rank running means ``H`` (``n`` tokens each), in place:
        ``H <- sum_r n_r H_r / sum_r n_r``. Returns ``(H, N)``. Every rank must hold an ``H`` of the same shape."""
        total = self.sum_int(n)
        if total == 0:
            raise RuntimeError("no rank saw any calibration token for this Hessian")
        H.mul_(float(n))
        self.all_reduce_(H)
        H.div_(float(total))
        return H, total

    def close(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(backend: str | None = None, device=None, timeout_s: float = 1800.0, split_rows: bool = True
                  ) -> Comm:
    """Join the process group described by torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT). Backend: NCCL when CUDA is available, else gloo. Device: ``cuda:LOCAL_RANK`` with CUDA (or the given
    one), else CPU. ``timeout_s`` bounds every collective, so a dead rank ends the others instead of hanging them."""
    import torch.distributed as dist
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"distributed run: environment variable {var} is not set (launch with torchrun)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device is None or device == "auto":
        device = torch.device(f"cuda:{local % max(torch.cuda.device_count(), 1)}") if torch.cuda.is_available() \
            else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local % torch.cuda.device_count()}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = dict(backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return Comm(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, split_rows=split_rows)


# ----------------------------------------------------------------------------------------------------- calibration
def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous near-equal shards: the first ``n % world_size`` ranks get one sample more."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_samples(calibration: torch.Tensor, comm: Comm | None) -> torch.Tensor:
    """This rank's rows of a (nsamples, seqlen) calibration tensor (all of it without ``comm``). Every rank needs at
    least one sample (its Hessians must exist to be reduced)."""
    if comm is None:
        return calibration
    calibration = torch.as_tensor(calibration)
    if calibration.dim() != 2:
        raise ValueError("distributed calibration must be a (nsamples, seqlen) tensor")
    if calibration.shape[0] < comm.world_size:
        raise ValueError(f"{calibration.shape[0]} calibration samples cannot feed {comm.world_size} ranks: use at "
                         "least one sample per rank")
    a, b = shard_bounds(calibration.shape[0], comm.rank, comm.world_size)
    return calibration[a:b]


# ----------------------------------------------------------------------------------------------------------- solves
@dataclass(frozen=True)
class Unit:
    """Rows ``[start, stop)`` of module ``name`` (index ``module`` in the stage's list), pruned on rank ``owner``."""

    module: int
    name: str
    start: int
    stop: int
    owner: int


def row_split_exact(config) -> bool:
    """Whether pruning row ranges separately gives the unsplit result: N:M masks are per row group; unstructured
    masks are per row for Wanda and for joint/SparseGPT with ``mask_scope="row"``; with ``mask_scope="block"``
    (and magnitude) the mask is chosen over all rows, so the layer must stay whole."""
    if config.sparsity.structured:
        return True
    if config.method == "wanda":
        return True
    return config.method in ("joint", "sparsegpt") and config.mask_scope == "row"


def plan_units(shapes: Sequence[tuple[str, int, int]], world_size: int, split_rows: bool = True,
               min_rows: int = 64) -> list[Unit]:
    """Assign modules ``(name, rows, cols)`` to ranks. Cost of a solve ~ ``cols^3 + rows cols^2`` (factorisation
    plus the row updates). Modules whose cost exceeds the per-rank share are split into row ranges when
    ``split_rows`` (each range pays the factorisation again); then longest-processing-time-first greedy assignment.
    Deterministic: every rank computes the same plan from the same shapes."""
    def cost(rows, cols):
        return float(cols) ** 3 + float(rows) * float(cols) ** 2

    total = sum(cost(r, c) for _, r, c in shapes)
    share = total / max(world_size, 1)
    pieces = []  # (cost, module index, name, start, stop)
    for mi, (name, rows, cols) in enumerate(shapes):
        k = 1
        if split_rows and world_size > 1 and cost(rows, cols) > share:
            k = min(world_size, max(1, rows // min_rows), int(-(-cost(rows, cols) // share)))
        bounds = [shard_bounds(rows, j, k) for j in range(k)]
        pieces += [(cost(b - a, cols), mi, name, a, b) for a, b in bounds if b > a]
    load = [0.0] * world_size
    units = []
    for c, mi, name, a, b in sorted(pieces, key=lambda p: (-p[0], p[1], p[3])):
        owner = min(range(world_size), key=lambda r: (load[r], r))
        load[owner] += c
        units.append(Unit(mi, name, a, b, owner))
    return sorted(units, key=lambda u: (u.module, u.start))


def prune_rows(W: torch.Tensor, H: torch.Tensor | None, config, bounds: Sequence[tuple[int, int]]):
    """Prune row ranges of ``W`` separately and stitch them: ``(weight, mask, loss)``. Equals ``prune_layer(W, H)``
    (same mask, weights within rounding) where ``row_split_exact(config)``."""
    from .algorithms import prune_layer
    parts = [prune_layer(W[a:b].contiguous(), H, config) for a, b in bounds]
    return (torch.cat([p.weight for p in parts]), torch.cat([p.mask for p in parts]),
            float(sum(p.loss for p in parts)))


def solve_group(comm: Comm, weights: Sequence[torch.Tensor], H: torch.Tensor | None, config) -> list:
    """Prune the weights of one group (modules reading one Hessian ``H``, identical on every rank) over the ranks of
    ``comm``: ``plan_units`` splits the group's rows into units (row ranges only where ``row_split_exact``), each
    rank prunes its units with one ``prune_group`` call (the group's shared Hessian setup, once per rank), and the
    owners broadcast their pruned rows, masks, row losses and notes. Returns one ``PruneResult`` per weight, the same
    on every rank: the stitched weight and mask, the row losses and their sum, the largest damping a unit needed
    (NaN where none recorded one), the first fallback, the exchanges and their seconds summed."""
    from .algorithms import prune_group
    from .algorithms.common import PruneResult
    split = comm.split_rows and row_split_exact(config)
    units = plan_units([(str(i), W.shape[0], W.shape[1]) for i, W in enumerate(weights)], comm.world_size, split,
                       comm.min_split_rows)
    mine = [u for u in units if u.owner == comm.rank]
    solved = dict(zip(mine, prune_group([weights[u.module][u.start:u.stop].contiguous() for u in mine], H, config)
                           if mine else []))
    notes = {k: v for part in comm.all_gather_object({(u.module, u.start): (r.fallback, r.row_loss.dtype)
                                                      for u, r in solved.items()}) for k, v in part.items()}
    pieces: list[list] = [[] for _ in weights]
    for u in units:  # every rank in the same order: the owner sends, the others receive
        W, rows = weights[u.module], u.stop - u.start
        if u.owner == comm.rank:
            r = solved.pop(u)
            weight = r.weight.to(W.dtype).contiguous()
            mask = r.mask.to(torch.uint8).contiguous()
            info = torch.cat([torch.tensor([float(r.loss), float(r.damp), float(r.exchanges), float(r.exchange_s)],
                                           dtype=torch.float64), r.row_loss.detach().double().cpu()]).to(comm.device)
        else:
            weight = torch.empty(rows, W.shape[1], dtype=W.dtype, device=comm.device)
            mask = torch.empty(rows, W.shape[1], dtype=torch.uint8, device=comm.device)
            info = torch.empty(4 + rows, dtype=torch.float64, device=comm.device)
        for t in (weight, mask, info):
            comm.broadcast_(t, u.owner)
        fallback, row_dtype = notes[(u.module, u.start)]
        pieces[u.module].append((weight, mask, info, fallback, row_dtype))
    out = []
    for W, parts in zip(weights, pieces):
        damps = [float(p[2][1]) for p in parts if p[2][1] == p[2][1]]
        out.append(PruneResult(weight=torch.cat([p[0] for p in parts]).to(W.device),
                               mask=torch.cat([p[1] for p in parts]).bool().to(W.device),
                               loss=float(sum(float(p[2][0]) for p in parts)),
                               row_loss=torch.cat([p[2][4:].to(p[4]) for p in parts]).to(W.device),
                               damp=max(damps) if damps else float("nan"),
                               fallback=next((p[3] for p in parts if p[3]), None),
                               exchanges=int(sum(float(p[2][2]) for p in parts)),
                               exchange_s=float(sum(float(p[2][3]) for p in parts))))
    return out


class UnitStats(NamedTuple):
    """What ``prune_units`` reports per module, the same on every rank."""
    loss: float
    sparsity: float           # pruned fraction
    seconds: float
    damp: float | None        # the largest damping a row range of it needed (None: not an OBS solve)
    fallback: str | None      # why another method was used for a row range of it (``PruneResult.fallback``)


def prune_units(comm: Comm, items: Sequence[tuple[str, torch.Tensor, torch.Tensor | None]], config,
                setters: Sequence) -> list[UnitStats]:
    """Prune several modules over the ranks, group by group: ``items``: ``(name, W 2-D view, H)`` per module
    (identical on every rank); the modules reading one Hessian (the same ``H`` object) form a group, solved by
    ``solve_group``; ``setters[i](rows_slice, value)`` writes module i's pruned rows. Returns per module
    ``UnitStats`` (loss, pruned fraction, seconds per module of its group's solve, damping, fallback), the same on
    every rank."""
    groups: dict[int, list[int]] = {}
    for i, (_, _, H) in enumerate(items):
        groups.setdefault(id(H), []).append(i)
    stats: list = [None] * len(items)
    for members in groups.values():
        t0 = time.perf_counter()
        results = solve_group(comm, [items[i][1].detach() for i in members], items[members[0]][2], config)
        secs = (time.perf_counter() - t0) / len(members)
        for i, r in zip(members, results):
            W = items[i][1]
            setters[i](slice(0, W.shape[0]), r.weight)
            stats[i] = UnitStats(r.loss, float(r.mask.sum()) / max(W.numel(), 1), secs,
                                 None if r.damp != r.damp else r.damp, r.fallback)
    return stats
