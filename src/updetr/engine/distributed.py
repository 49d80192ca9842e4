"""torch.distributed helpers. State comes from torchrun's environment, never from globals we set."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """A process group is up: several processes, or one launched by ``torchrun``."""
        return self.world_size > 1 or is_dist()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device a config's ``device`` names; ``auto`` picks CUDA (this process's local GPU)
    when available, else CPU.

    Raises:
        ConfigError: the name is not a device, or names one this machine does not have (CUDA
            without a GPU or a CUDA build, a GPU index past the last one, MPS off a Mac).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={name!r} is not one of auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"device={name!r}: CUDA is not available ({why}); use --device cpu or auto")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r}: GPU {index} does not exist ({torch.cuda.device_count()} visible)")
        return torch.device("cuda", index)
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device={name!r}: MPS (Apple GPU) is not available here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={name!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by ``torchrun`` (NCCL on GPUs, Gloo on CPUs).

    ``torchrun --nproc_per_node=1`` gets a process group of one (and DDP), so the collective
    path can be checked on a single GPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    launched = world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if launched and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # device_id binds NCCL to this process's GPU (collectives and barrier() need not guess it)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
        log.info("initialised %s process group: rank %d of %d", backend, rank, world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over processes (identity in a single process)."""
    if not is_dist() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def any_across_processes(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true in any process (itself in a single process); a collective call."""
    if not is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def gather_lists(items: list) -> list:
    """The concatenation of every process's ``items`` (picklable), in rank order; a collective call."""
    if not is_dist():
        return list(items)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
