"""Running under ``torchrun``: what the launcher says, the default device, and the process group."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Launch:
    """What ``torchrun`` told this process through its environment (defaults: one process)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Launch:
        env = os.environ
        return cls(int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        """Whether this is the process that writes files and prints (rank 0)."""
        return self.rank == 0

    def default_device(self, distributed: bool | None = None) -> torch.device | None:
        """``cuda:LOCAL_RANK`` for a distributed run on a CUDA machine, else ``None`` (keep the model's)."""
        wanted = self.world > 1 if distributed is None else distributed
        return torch.device("cuda", self.local_rank) if wanted and torch.cuda.is_available() else None


@dataclass
class Group:
    """The process group training runs in; ``created`` if :func:`join` started it (and ends it)."""

    world: int = 1
    rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self, *, wait: bool = True) -> None:
        """End the group if :func:`join` started it; with ``wait`` (a run that finished: every
        process gets here), once every process is done with it.

        Call it after dropping the DDP/FSDP wrappers and the optimizer: collected now (not at
        interpreter exit), their last collectives' buffers are released while Python still runs.
        A gloo worker thread that drops a tensor during interpreter shutdown needs the GIL, is
        stopped by the interpreter, and the process aborts ("terminate called without an active
        exception"), losing the run's last seconds and its exit status."""
        if not self.created:
            return
        gc.collect()
        if wait:  # no process leaves while another still talks to it (not after an error: it may never come)
            dist.barrier()
        dist.destroy_process_group()


def join(device: torch.device, distributed: bool | None) -> Group:
    """Join (or start) the process group for ``device`` (gloo on CPU, NCCL on CUDA); a single
    process unless ``distributed`` or launched with ``WORLD_SIZE`` > 1."""
    if distributed is None:
        distributed = Launch.from_env().world > 1 or (dist.is_available() and dist.is_initialized()
                                                      and dist.get_world_size() > 1)
    if not distributed:
        return Group()
    if not dist.is_available():
        raise RuntimeError("distributed=True but torch.distributed is not available in this build")
    created = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError("distributed=True needs a launcher that sets RANK, WORLD_SIZE, "
                               "MASTER_ADDR and MASTER_PORT, e.g. torchrun --nproc_per_node=2 ...")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return Group(dist.get_world_size(), dist.get_rank(), created)
