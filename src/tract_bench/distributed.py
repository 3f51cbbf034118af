"""DDP under torchrun: process-group set-up, rank-0-only writing, metric reduction.

`torchrun --nproc_per_node=K -m tract_bench.cli ...` sets RANK/WORLD_SIZE/LOCAL_RANK; without them everything
here is a no-op and tract-train runs as one process. `batch_size` stays the global batch.
"""

import contextlib
import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int, int]:
    """(rank, world_size, local_rank), initialising the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), local


def sum_all(*values: torch.Tensor) -> list[torch.Tensor]:
    """Sum scalar tensors over all ranks (one collective); identity in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    packed = torch.stack([v.double() for v in values])
    dist.all_reduce(packed)
    return list(packed.unbind())


def from_rank0(value):
    """Rank 0's `value` on every rank (e.g. a choice only rank 0 timed); the value itself in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first (e.g. a download into a shared folder), the other ranks after it."""
    ranked = dist.is_available() and dist.is_initialized()
    if ranked and dist.get_rank() != 0:
        dist.barrier()
    yield
    if ranked and dist.get_rank() == 0:
        dist.barrier()


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
