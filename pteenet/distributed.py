"""Several processes (``torchrun``): the process group, how the data is sharded, what is gathered.

``torchrun --nproc_per_node N -m pteenet train-branches ...`` starts N copies of the command; each
joins the group the launcher describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...): NCCL on CUDA,
Gloo on the CPU. Every rank runs the frozen backbone on its shard under ``no_grad``; only the
branches are wrapped in ``DistributedDataParallel``, so only their gradients are averaged.

Same result as one process: the global batch ``--batch-size`` is the batch one process would draw
(same generator, same permutation), cut into N interleaved slices, one per rank; the losses are
means over samples, and DDP averages the ranks' gradients, so the update is that of one process.
The branches' BatchNorm layers normalise with the statistics of the whole global batch
(``ddp_branches.synced_batchnorm``: two all-reduces of per-channel sums, on any backend; torch's own
SyncBatchNorm runs on GPUs only). What differs is the order of floating-point sums (the all-reduce
adds per-rank partial sums), so weights agree to rounding, not bit for bit.

With a feature cache each rank caches a fixed 1/N of the training images and draws its batches
from that shard: the same statistics as one process, not the same batches.

Only rank 0 writes files (atomically) and reports; the others wait at a barrier after each write.
Evaluation passes (the calibration report, the ensemble's inputs, the sweep's cache) are sharded
without padding and gathered back into the split's order. A collective waits at most
``PTEENET_DIST_TIMEOUT_MIN`` minutes (default 30) for a rank that hangs; a rank that dies is seen
at once (its connections close).
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .errors import PteenetError


@dataclass(frozen=True)
class Group:
    """This process's place among the ones the launcher started (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


ALONE = Group()


class OtherRankFailed(PteenetError):
    """Another rank hit an error that rank 0 reports; this rank stops without repeating it."""

    quiet = True


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0, or no launcher; readable before the group exists (the CLI picks its sink with it)."""
    return os.environ.get("RANK", "0") == "0"


def current() -> Group:
    if not (dist.is_available() and dist.is_initialized()):
        return ALONE
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device) -> tuple[Group, torch.device]:
    """Join the launcher's process group once per process (or run alone); the device of this rank
    (``cuda:LOCAL_RANK`` on CUDA)."""
    if launched() and not dist.is_initialized():
        if not dist.is_available():
            raise PteenetError("started by torchrun, but this torch has no torch.distributed", "run a single process")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(local)
        minutes = float(os.environ.get("PTEENET_DIST_TIMEOUT_MIN", "30"))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=minutes))
        atexit.register(_teardown)
        # torchrun stops the other ranks with SIGTERM when one fails: end like Ctrl-C (the output
        # keeps its last complete epoch, temp files are removed) instead of dying mid-write.
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            signal.signal(signal.SIGTERM, _interrupt)
    group = current()
    if group.active and device.type == "cuda":
        device = torch.device("cuda", group.local_rank)
    if group.active and device.type == "mps":
        raise PteenetError("several processes on MPS are not supported", "use --device cpu or cuda under torchrun")
    return group, device


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- collectives, each a no-op alone ---------------------------------------------------------------
def barrier(group: Group) -> None:
    if group.active:
        dist.barrier()


def gather_objects(obj: Any, group: Group) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank."""
    if not group.active:
        return [obj]
    out: list[Any] = [None] * group.world
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: Any, group: Group) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not group.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_loss(loss: torch.Tensor, group: Group) -> float:
    """The loss averaged over ranks (every rank then agrees on whether it is finite)."""
    if not group.active:
        return float(loss.detach())
    t = loss.detach().float().clone().reshape(1)
    dist.all_reduce(t)
    return float(t) / group.world


def sum_arrays(sums: dict[str, Any], n: int, group: Group) -> tuple[dict[str, Any], int]:
    """Per-rank running sums (a ``_Meter``'s) added over ranks."""
    if not group.active:
        return sums, n
    parts = gather_objects((sums, n), group)
    total: dict[str, Any] = {}
    for s, _ in parts:
        for k, v in s.items():
            total[k] = total.get(k, 0) + v
    return total, sum(c for _, c in parts)


@contextlib.contextmanager
def agreed(group: Group) -> Iterator[None]:
    """A setup phase that every rank runs: an error on any rank stops every rank, and only rank 0
    reports it (named after the rank that hit it), so torchrun prints one error, not N."""
    err: PteenetError | None = None
    try:
        yield
    except PteenetError as e:
        if not group.active:
            raise
        err = e
    if not group.active:
        return
    errors = gather_objects(None if err is None else (type(err).__name__, err.message, err.hint), group)
    first = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
    if first is None:
        return
    rank, (_, message, hint) = first
    if group.main:
        raise PteenetError(message if rank == 0 else f"rank {rank}: {message}", hint) from None
    raise OtherRankFailed(message, hint) from None


def is_comm_error(e: BaseException) -> bool:
    """Whether an exception is a failed collective (a peer gone), not a bug of ours."""
    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        w in text for w in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe"))


def lost_peer(phase: str, held: str) -> PteenetError:
    """The error for a collective that failed because a peer is gone; the broken group is let go
    now, not at exit, where tearing it down with work still pending can abort the process."""
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    return PteenetError(f"lost contact with another process in {phase} (a rank died or was killed); {held}",
                        "fix the cause, then rerun the same torchrun command with --resume")


# -- sharding --------------------------------------------------------------------------------------
def check_shardable(n_train: int, batch_size: int, group: Group) -> None:
    if not group.active:
        return
    if batch_size % group.world:
        raise PteenetError(f"--batch-size {batch_size} (the global batch) does not split evenly over "
                           f"{group.world} processes", f"use a multiple of {group.world}")
    if n_train < group.world:
        raise PteenetError(f"{group.world} processes but only {n_train} training image{'s' * (n_train != 1)}: "
                           "some would get none", f"start at most {max(n_train, 1)} (--nproc_per_node), or use more data")


class ShardBatches(Sampler[list[int]]):
    """This rank's slice of each batch one process would draw. The permutation comes from
    ``generator`` exactly as a shuffling DataLoader draws it (its base seed first, then
    ``randperm`` twice an epoch: the second is the sampler's drawn-and-discarded tail), so the
    generator state after an epoch is the single-process one and resume stays exact.
    ``even``: a batch is cut to a multiple of the world size (training: the ranks' means weigh equally)."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, generator: torch.Generator | None,
                 group: Group, even: bool) -> None:
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.generator, self.group, self.even = generator, group, even

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def global_batches(self) -> Iterator[torch.Tensor]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for i in range(len(self)):
            b = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield b[:len(b) - len(b) % self.group.world] if self.even else b
        if self.shuffle:
            torch.randperm(self.n, generator=self.generator)

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.global_batches():
            yield b[self.group.rank::self.group.world].tolist()


def eval_rows(n: int, batch_size: int, group: Group) -> list[int]:
    """The rows of an unshuffled split this rank evaluates, in the order it sees them."""
    sampler = ShardBatches(n, batch_size, False, False, None, group, even=False)
    return [i for b in sampler for i in b]


def train_rows(n: int, group: Group) -> list[int]:
    """This rank's fixed shard of a feature-cached training split: equal sizes on every rank."""
    return list(range(group.rank, n - n % group.world, group.world))


# -- gathering per-rank results back into the split's order ---------------------------------------
def gather_rows(rows: Sequence[int], arrays: Any, axis_last: bool, group: Group, to_main_only: bool) -> Any:
    """Per-rank arrays (numpy or tensors, or a list/dict of them; None for no rows) of the rows
    ``rows`` (sample axis first, or last with ``axis_last``) put together in the split's order;
    None on ranks other than 0 with ``to_main_only``, and when no rank had rows."""
    if not group.active:
        return arrays
    payload = (list(rows), arrays)
    if to_main_only:
        parts: list[Any] = [None] * group.world if group.main else []
        dist.gather_object(payload, parts if group.main else None, dst=0)
        if not group.main:
            return None
    else:
        parts = gather_objects(payload, group)
    parts = [(r, a) for r, a in parts if a is not None]  # ranks whose shard was empty
    if not parts:
        return None
    index = [i for r, _ in parts for i in r]
    order = sorted(range(len(index)), key=index.__getitem__)
    return _join([a for _, a in parts], order, axis_last)


def _join(parts: list[Any], order: list[int], axis_last: bool) -> Any:
    import numpy as np

    first = parts[0]
    if isinstance(first, dict):
        return {k: _join([p[k] for p in parts], order, axis_last) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_join([p[i] for p in parts], order, axis_last) for i in range(len(first)))
    if first is None:
        return None
    if torch.is_tensor(first):
        cat = torch.cat(list(parts), dim=-1 if axis_last else 0)
        idx = torch.tensor(order, dtype=torch.long)
        return cat.index_select(cat.dim() - 1 if axis_last else 0, idx)
    cat = np.concatenate(parts, axis=-1 if axis_last else 0)
    return np.take(cat, order, axis=-1 if axis_last else 0)


# -- resume: every rank's random state --------------------------------------------------------------
def rank_rng_states(device: torch.device, group: Group) -> dict[str, torch.Tensor]:
    """The RNG states of ranks 1.. (rank 0's are the single-process keys), gathered for rank 0 to save."""
    if not group.active:
        return {}
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    out: dict[str, torch.Tensor] = {}
    for r, st in enumerate(gather_objects(mine, group)):
        if r:
            out.update({f"rng.{k}.rank{r}": v for k, v in st.items()})
    return out


def restore_rank_rng(state: dict[str, torch.Tensor], device: torch.device, group: Group) -> None:
    if not group.main:
        torch.set_rng_state(state[f"rng.cpu.rank{group.rank}"])
        if device.type == "cuda" and f"rng.cuda.rank{group.rank}" in state:
            torch.cuda.set_rng_state(state[f"rng.cuda.rank{group.rank}"], device)


def check_resume_world(training: dict[str, Any], group: Group) -> None:
    was = int(training.get("world_size", 1))
    if was != group.world:
        raise PteenetError(f"the run being resumed ran on {was} process{'es' if was > 1 else ''}, "
                           f"this one on {group.world}",
                           f"resume with the same number of processes (torchrun --nproc_per_node {was})"
                           if was > 1 else "resume without torchrun, as a single process")
