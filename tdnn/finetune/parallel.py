"""How the processes of a run hold the model: one process or DDP replicas (:class:`Replicas`), or
FSDP2 shards (:class:`Shards`) — and the one way to read and write its weights and optimizer state
whichever it is, so checkpoints hold full, unsharded tensors either way."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from tdnn.finetune.distributed import Group
from tdnn.statistics.blockwise import find_blocks

State = dict[str, Any]


class Replicas:
    """One process, or one ``DistributedDataParallel`` replica per process: the user's model is
    trained as it is (``module``), through ``net``."""

    restores_locally = True  # weights can be put back by one process alone (after an error, say)

    def __init__(self, model: nn.Module, group: Group, device: torch.device) -> None:
        self.model = self.module = model.to(device)
        self.load_device = device  # where a checkpoint is read to
        self.net: nn.Module = model if group.world == 1 else nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def teacher(self, teacher: nn.Module, device: torch.device) -> nn.Module:
        """The teacher as this run calls it."""
        return teacher.to(device)

    def model_state(self) -> State:
        """The full weights (on the main process at least)."""
        return self.module.state_dict()

    def load_model_state(self, state: State) -> None:
        """Put weights from :meth:`model_state` back (every process passes what it got there)."""
        self.module.load_state_dict(state)

    def optimizer_state(self, opt: torch.optim.Optimizer) -> State:
        return opt.state_dict()

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: State) -> None:
        opt.load_state_dict(state)

    def finish(self) -> None:
        """Leave the trained weights in the user's model (they are there already)."""


class Shards(Replicas):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``): every process holds ``1/W`` of each
    parameter, its gradient and its optimizer state; a block's parameters are gathered just for
    its forward and backward.

    The sharded module is a twin of the model made on the meta device (no second copy in memory),
    each block (the longest ``nn.ModuleList`` of one module type, as in block-wise calibration) and
    the root sharded, then filled from the model; the user's model is left a plain module and gets
    the trained weights back at the end (:meth:`finish`). Ties between parameters are kept.
    """

    restores_locally = False  # loading weights is a collective: every process must take part

    def __init__(self, model: nn.Module, group: Group, device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.model = model
        self.load_device = torch.device("cpu")  # full tensors: only rank 0's are used, never on a device
        self.mesh = init_device_mesh(device.type, (group.world,))
        self.module = self.net = self._shard(model, device, frozen=False)

    def teacher(self, teacher: nn.Module, device: torch.device) -> nn.Module:
        """The teacher sharded the same way (it need not fit one device either)."""
        return self._shard(teacher, device, frozen=True)

    def _shard(self, model: nn.Module, device: torch.device, *, frozen: bool) -> nn.Module:
        """A sharded twin of ``model``; ``frozen`` (forward only): the root is resharded after its
        forward too, as no backward follows to do it."""
        from torch.distributed.fsdp import fully_shard

        memo: dict[int, Any] = {}  # deepcopy maps each tensor to an empty one on meta: ties stay ties
        for t in [*model.parameters(), *model.buffers()]:
            empty = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
        twin = copy.deepcopy(model, memo)
        names = find_blocks(twin, None, lambda m: any(True for _ in m.parameters()))
        for name in names:
            fully_shard(twin.get_submodule(name), mesh=self.mesh)
        fully_shard(twin, mesh=self.mesh, reshard_after_forward=True if frozen else None)
        twin.to_empty(device=device)
        _set_model_state(twin, model.state_dict(), broadcast=False)
        with torch.no_grad():  # buffers are not sharded; non-persistent ones are in no state dict
            for name, buffer in model.named_buffers():
                twin.get_buffer(name).copy_(buffer)
        _aliases(model, twin)
        return twin

    def model_state(self) -> State:
        """The full weights on the main process's CPU (an empty dict on the others)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, state: State) -> None:
        _set_model_state(self.module, state, broadcast=True)

    def optimizer_state(self, opt: torch.optim.Optimizer) -> State:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, opt,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: State) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.module, opt, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def finish(self) -> None:
        """Gather the trained weights into the user's (plain) model, on every process, one tensor
        at a time (the whole model need not fit the device)."""
        from torch.distributed.tensor import DTensor

        targets = self.model.state_dict()
        with torch.no_grad():
            for name, value in self.module.state_dict().items():
                targets[name].copy_(value.full_tensor() if isinstance(value, DTensor) else value)


def _aliases(model: nn.Module, twin: nn.Module) -> None:
    """Point tensor attributes that are not parameters or buffers (e.g. an alias of a buffer kept
    as a plain attribute, as some rotary embeddings do) where the model's point: to the twin's
    buffer of the same tensor, else to a copy — not to the empty meta tensor the twin was made with."""
    for name, module in model.named_modules():
        copy_of = twin.get_submodule(name)
        buffers = {id(b): n for n, b in module.named_buffers(recurse=False)}
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                device = next((b.device for b in copy_of.buffers()), value.device)
                setattr(copy_of, attr, copy_of.get_buffer(buffers[id(value)]) if id(value) in buffers
                        else value.detach().clone().to(device))


def _set_model_state(module: nn.Module, state: State, *, broadcast: bool) -> None:
    """Load full weights into sharded ``module``; with ``broadcast`` only the main process's count."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast))


def holder(model: nn.Module, group: Group, device: torch.device, parallel: str) -> Replicas:
    """How this run holds ``model``: ``parallel`` (``"ddp"`` or ``"fsdp"``) with several processes."""
    return Shards(model, group, device) if parallel == "fsdp" and group.world > 1 else Replicas(model, group, device)
