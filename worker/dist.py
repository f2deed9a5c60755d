"""Collectives the worker needs under torchrun; each is a no-op in a single process."""

from __future__ import annotations

from typing import Any


def world() -> tuple[int, int]:
    """(world size, rank) of the initialised process group; (1, 0) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def barrier() -> None:
    import torch.distributed as dist

    if world()[0] > 1:
        dist.barrier()


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's value of ``obj`` on every rank."""
    import torch.distributed as dist

    if world()[0] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, device: Any) -> bool:
    """True on every rank if ``flag`` is true on any rank (all ranks stop at the same step)."""
    import torch
    import torch.distributed as dist

    if world()[0] == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def any_ranks(flags: list[bool], device: Any) -> list[bool]:
    """Each of ``flags`` true on every rank if it is true on any rank, in one collective."""
    import torch
    import torch.distributed as dist

    if world()[0] == 1:
        return list(flags)
    t = torch.tensor([1 if f else 0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (small picklable values only)."""
    import torch.distributed as dist

    size = world()[0]
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0; None on the other ranks."""
    import torch.distributed as dist

    size, rank = world()
    if size == 1:
        return [obj]
    out: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
