"""Calibration one block at a time, as GPTQ and SVD-LLM do: the inputs each block gets are captured
once, then each block's layers are calibrated and compressed on cached inputs and the block's
outputs passed on, so passes and memory grow with one block, not with the model.

A *block* is a module called once per forward with the previous block's output (a transformer
layer, a ResNet stage): ``blocks`` names them, or they are found (the longest ``nn.ModuleList`` of
modules of one type holding layers to compress). Without blocks the whole model is one block.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from tdnn.core import temporary
from tdnn.core.batches import batch_mask
from tdnn.layers.registry import Geometry
from tdnn.statistics.calibration import Calibration
from tdnn.statistics.hooks import collect, collect_pairs, run
from tdnn.statistics.moments import InputStats
from tdnn.statistics.refine import BlockRefinement, Refine, refine_block
from tdnn.statistics.sensitivity import fisher_weights, output_of

Hidden = Any  # what flows from block to block: a tensor (or, for the whole model, the batch)
_NO_CACHE = ("past_key_value", "past_key_values", "layer_past")  # kwargs a replay must not update


class _Stop(BaseException):
    """Raised after the last block during the capture: the rest of the model is not needed (a
    BaseException, so that no ``except Exception`` in the model's own code swallows it)."""


class _Refused(BaseException):
    """Carries a capture hook's error out of the model's forward, past whatever wraps the model's
    own errors, to be raised as it is."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


def first_tensor(output: Any, name: str = "a block") -> torch.Tensor:
    """A block's hidden-state output: the tensor itself, or the first element of a tuple.

    Raises:
        TypeError: naming the block, for any other output (a dict, say).
    """
    while isinstance(output, (tuple, list)) and output:
        output = output[0]
    if hasattr(output, "last_hidden_state"):
        output = output.last_hidden_state
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"blocks: {name} returned a {type(output).__name__}, not a tensor or a tuple starting "
                        f"with one; name other blocks (blocks=[...]), or blocks=[] to calibrate in one pass")
    return output


def find_blocks(model: nn.Module, spec: str | Sequence[str] | None, has_layers: Callable[[nn.Module], bool]
                ) -> list[str]:
    """Names of the blocks: ``spec`` as names, a ``"re:"`` pattern or the name of a ModuleList; for
    ``None`` the longest ModuleList of two or more modules of one type holding layers; else ``[]``.

    Raises:
        ValueError: for a name that is not a module of ``model``.
    """
    names = dict(model.named_modules())
    if spec is None:
        lists = [(n, m) for n, m in names.items() if isinstance(m, nn.ModuleList) and len(m) > 1
                 and len({type(c) for c in m}) == 1 and all(has_layers(c) for c in m)]
        if not lists:
            return []
        name, blocks = max(lists, key=lambda item: len(item[1]))
        return [f"{name}.{i}" if name else str(i) for i in range(len(blocks))]
    if isinstance(spec, str) and spec.startswith("re:"):
        pattern = re.compile(spec[3:])
        return [n for n in names if n and pattern.fullmatch(n)]
    specs = [spec] if isinstance(spec, str) else list(spec)
    for name in specs:
        if name not in names:
            raise ValueError(f"blocks: {type(model).__name__} has no module {name!r}")
    if isinstance(spec, str) and isinstance(names[spec], nn.ModuleList):
        return [f"{spec}.{i}" for i in range(len(names[spec]))]
    return specs


@dataclass
class Segment:
    """One block and, per calibration batch, the arguments it is called with (all but the hidden
    state, which goes in ``slot``: an argument index or a keyword)."""

    name: str
    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    slot: int | str | None = None  # None: the whole model, called on the batch itself

    def run(self, module: nn.Module, i: int, x: Hidden, cut: Callable[[Any], Any] | None = None) -> Hidden:
        """``module`` (the block, or a copy of it) on batch ``i`` with hidden state ``x``; with ``cut``,
        on some rows of the batch: ``x`` holds them, and ``cut`` cuts the batch's other arguments alike."""
        if self.slot is None:
            return run(module, x, i)
        args, kwargs = self.calls[i]
        if cut is not None:
            args, kwargs = cut(args), cut(kwargs)
        if isinstance(self.slot, int):
            return first_tensor(module(*args[:self.slot], x, *args[self.slot:], **kwargs), self.name)
        return first_tensor(module(*args, **{**kwargs, self.slot: x}), self.name)


@dataclass
class Chain:
    """What the blocks are called with: the first block's hidden state per batch, and each block's
    other arguments; ``masks`` holds each batch's attention mask (padding kept out of statistics)."""

    segments: list[Segment]
    inputs: list[Hidden]
    masks: list[torch.Tensor | None]


def _hidden(args: tuple, kwargs: dict) -> tuple[int | str, torch.Tensor]:
    if args and isinstance(args[0], torch.Tensor):
        return 0, args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return "hidden_states", kwargs["hidden_states"]
    raise TypeError("a block must take its hidden state as the first argument or as hidden_states=")


@torch.no_grad()
def capture(model: nn.Module, names: list[str], batches: list[Any], *,
            glue: dict[str, tuple[nn.Module, Geometry]] | None = None) -> tuple[Chain, dict[str, InputStats]]:
    """Run ``model`` once per batch and record what each named block is called with; check that
    each block takes the previous one's output. The same pass collects the statistics of the
    ``glue`` layers (outside the blocks: name -> (module, geometry)); without any, it stops after
    the last block.

    Raises:
        ValueError: if a block is not called exactly once per forward, or not on the previous
            block's output.
    """
    masks = [batch_mask(b) for b in batches]
    if not names:
        return Chain([Segment("")], list(batches), masks), {}
    segments, inputs, last = [Segment(n) for n in names], [], {}
    blocks = [model.get_submodule(n) for n in names]
    whole = [True]  # run the whole forward (batch 0: a block called again after the last one is seen)

    def pre(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            slot, x = _hidden(args, kwargs)
            if i == 0:
                inputs.append(x)
            elif x is not last.get(i - 1):
                raise _Refused(ValueError(f"blocks: {names[i]} is not called on the output of {names[i - 1]}; name "
                                          f"blocks that feed each other (blocks=[...]), or blocks=[] for one pass"))
            rest = args[:slot] + args[slot + 1:] if isinstance(slot, int) else args
            kept = {k: (None if k in _NO_CACHE else v) for k, v in kwargs.items() if k != slot}
            segments[i].slot = slot
            segments[i].calls.append((rest, kept))
        return hook

    def post(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            try:
                last[i] = first_tensor(output, names[i])
            except TypeError as err:
                raise _Refused(err) from None
            if i == len(blocks) - 1 and not glue and not whole[0]:
                raise _Stop  # the rest of the model (an LM head: large logits) is not needed
        return hook

    def one(b: int, batch: Any) -> None:
        last.clear()
        whole[0] = b == 0
        try:
            run(model, batch, b)
        except _Stop:
            pass
        except _Refused as refused:
            raise refused.error from None
        for i, segment in enumerate(segments):
            if len(segment.calls) != b + 1:
                raise ValueError(f"blocks: {names[i]} ran {len(segment.calls) - b} times on calibration batch {b}; "
                                 f"a block must run once per forward (name blocks that do with blocks=[...], or "
                                 f"blocks=[] to calibrate the whole model in one pass)")

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post(i), with_kwargs=True))
    with temporary.hooks(handles), temporary.modes({model: False}), _no_cache(model):
        if glue:
            stats = collect(model, batches, glue, runner=one, masks=masks)
        else:
            stats = {}
            for b, batch in enumerate(batches):
                one(b, batch)
    return Chain(segments, inputs, masks), stats


class _no_cache:
    """``config.use_cache = False`` for the block (a Hugging Face model would grow a KV cache)."""

    def __init__(self, model: nn.Module) -> None:
        self.config = getattr(model, "config", None)
        self.old = getattr(self.config, "use_cache", None)

    def __enter__(self) -> None:
        if self.old is not None:
            self.config.use_cache = False

    def __exit__(self, *exc: object) -> None:
        if self.old is not None:
            self.config.use_cache = self.old


def groups(block: nn.Module, segment: Segment, x: Hidden, layers: dict[str, nn.Module]) -> list[list[str]]:
    """The block's layers in the order they run on ``x`` (batch 0), those reading the very same
    input tensor together (Q, K and V): one sequential step each."""
    order: list[tuple[str, torch.Tensor, int]] = []  # (name, its input, the input's version), kept alive
    handles = []
    for name, module in layers.items():
        def hook(m: nn.Module, args: tuple, name: str = name) -> None:
            if all(n != name for n, _, _ in order):
                order.append((name, args[0], args[0]._version))
        handles.append(module.register_forward_pre_hook(hook))
    with temporary.hooks(handles), temporary.modes({block: False}), torch.no_grad():
        segment.run(block, 0, x)
    steps: list[list[str]] = []
    for i, (name, seen, version) in enumerate(order):
        if i and seen is order[i - 1][1] and version == order[i - 1][2]:
            steps[-1].append(name)
        else:
            steps.append([name])
    missed = [n for n in layers if all(n != name for name, _, _ in order)]
    return steps + ([missed] if missed else [])


class Replacer(Protocol):
    """What block-wise calibration asks of its caller (:func:`tdnn.compress_model`): the model being
    compressed as it is now (its root changes if the root itself is swapped) and, per layer, what
    to do with it given its input statistics — swap a factorized form in, or keep it dense."""

    @property
    def model(self) -> nn.Module: ...

    def replace(self, name: str, stats: InputStats) -> None: ...


T = TypeVar("T")


RETAIN_BYTES = 1 << 28  # what a survey may keep of its statistics for the same call's factorizing pass


@dataclass
class _Survey(Generic[T]):
    """A :class:`Replacer` that measures each layer's statistics and swaps nothing; it keeps the
    statistics (their square roots, once measured) while they fit in :data:`RETAIN_BYTES`."""

    model: nn.Module
    measure: Callable[[str, InputStats], T]
    results: dict[str, T] = field(default_factory=dict)
    kept: dict[str, InputStats] | None = field(default_factory=dict)
    kept_bytes: int = 0

    def replace(self, name: str, stats: InputStats) -> None:
        self.results[name] = self.measure(name, stats)
        if self.kept is not None:
            self.kept_bytes += sum(r.chol.numel() * r.chol.element_size() for r in stats.roots.values()
                                   if r.chol is not None and stats.same_as is None)
            self.kept[name] = stats
            if self.kept_bytes > RETAIN_BYTES:
                self.kept = None  # too large to keep them all: the factorizing pass collects them again


def _within(block: str, name: str) -> str:
    return name[len(block) + 1:] if block else name


class BlockCompressor:
    """One pass over the blocks of ``runs``, handing each layer's statistics to ``replacer``
    (see the module docstring).

    One-shot (``sequential=False``): each block's statistics come from the dense model's inputs;
    one pass per block, which also gives the next block its (dense) inputs. Sequential: each
    step of a block (the layers reading one input, in execution order) is fitted to what the
    *original* layers computed on the original inputs, given the inputs the already-compressed
    layers and blocks before it pass on (cross moments of a reference stream and the compressed
    stream); a copy of one block is the reference.
    """

    def __init__(self, runs: Runs, replacer: Replacer, *, sequential: bool, refine: Refine | None = None) -> None:
        self.runs, self.replacer, self.sequential, self.refine = runs, replacer, sequential, refine
        self.chain = runs.chain()
        self.refined: list[BlockRefinement] = []

    def run(self) -> None:
        current = reference = self.chain.inputs
        for segment in tqdm(self.chain.segments, desc="blocks", disable=not self.runs.progress, leave=False):
            layers = [n for n in self.runs.inside.get(segment.name, []) if n in self.runs.selected]
            if self.sequential:
                outputs, targets = self._sequential(segment, layers, current, reference)
            else:  # statistics and targets from the dense stream; the compressed one only if refined
                targets = self._one_shot(segment, layers, reference)
                outputs = targets if self.refine is None else None
            if self.refine is not None:
                outputs = self._refined(segment, current, targets)
            current, reference = outputs, targets
            _trim()

    def _refined(self, segment: Segment, xs: list[Hidden], targets: list[Hidden]) -> list[Hidden]:
        """Refine the block (:mod:`tdnn.statistics.refine`); its outputs on ``xs``, refined or not."""
        block = self._block(segment.name)
        record = refine_block(segment.name or "<model>", segment, block, xs, [output_of(t)[0] for t in targets],
                              self.chain.masks, self.refine)
        if record is not None:
            self.refined.append(record)
        with torch.no_grad(), temporary.modes({block: False}):
            return [segment.run(block, i, x) for i, x in enumerate(xs)]

    @property
    def model(self) -> nn.Module:
        return self.replacer.model

    def _block(self, name: str) -> nn.Module:
        return self.model.get_submodule(name) if name else self.model

    def _layers(self, names: list[str]) -> dict[str, tuple[nn.Module, Geometry]]:
        return {n: (self.model.get_submodule(n), self.runs.layers[n][1]) for n in names}

    def _one_shot(self, segment: Segment, names: list[str], xs: list[Hidden]) -> list[Hidden]:
        block, outputs = self._block(segment.name), []

        def runner(i: int, x: Hidden) -> None:
            outputs.append(segment.run(block, i, x))

        stats = collect(block, xs, self._layers(names), runner=runner, masks=self.chain.masks)
        for name in names:
            self.replacer.replace(name, stats[name])
        return outputs

    def _sequential(self, segment: Segment, names: list[str], xs: list[Hidden], refs: list[Hidden]
                    ) -> tuple[list[Hidden], list[Hidden]]:
        block, reference = self._block(segment.name), self.runs.reference
        original = reference if (not segment.name and reference is not None) else copy.deepcopy(block)
        if names:
            first = collect(block, xs, self._layers(names), masks=self.chain.masks,
                            runner=lambda i, x: segment.run(block, i, x))
            for step in groups(block, segment, xs[0], {n: self.model.get_submodule(n) for n in names}):
                pairs = {n: (self.model.get_submodule(n), original.get_submodule(_within(segment.name, n)),
                             self.runs.layers[n][1]) for n in step}
                stats = collect_pairs(
                    block, original, len(xs), pairs, masks=self.chain.masks,
                    runner=lambda i, m: segment.run(m, i, refs[i] if m is original else xs[i]))
                for name in step:
                    stats[name].out_scale = first[name].out_scale
                    self.replacer.replace(name, stats[name])
        with torch.no_grad(), temporary.modes({block: False, original: False}):
            return ([segment.run(block, i, x) for i, x in enumerate(xs)],
                    [segment.run(original, i, x) for i, x in enumerate(refs)])


class Runs:
    """The calibration passes of one :func:`tdnn.compress_model` call over ``layers`` (name ->
    (module, geometry)): the blocks found, their inputs captured once (on the dense model), and the
    layers outside any block calibrated in one pass of the whole model. With a keeping
    :class:`tdnn.Calibration`, one-shot statistics come from (and go to) its cache."""

    def __init__(self, model: nn.Module, layers: dict[str, tuple[nn.Module, Geometry]], calibration: Calibration,
                 *, blocks: Any, reference: nn.Module | None, progress: bool) -> None:
        self.model, self.layers, self.calibration, self.blocks = model, layers, calibration, blocks
        self.batches, self.reference, self.progress = calibration.batches, reference, progress
        ids = {id(m) for m, _ in layers.values()}
        self.names = find_blocks(model, blocks, lambda m: any(id(x) in ids for x in m.modules()))
        self.inside = ({b: [n for n in layers if n == b or n.startswith(b + ".")] for b in self.names}
                       if self.names else {"": list(layers)})
        self.glue = [n for n in layers if not any(n in members for members in self.inside.values())]
        self.selected = list(layers)
        self._chain: Chain | None = None
        self._glue_stats: dict[str, InputStats] = {}
        self._surveyed: dict[str, InputStats] | None = None  # kept by the last survey

    def over(self, calibration: Calibration) -> Runs:
        """The same passes over other calibration data (nothing captured yet)."""
        return Runs(self.model, self.layers, calibration, blocks=self.blocks, reference=self.reference,
                    progress=self.progress)

    def only(self, names: list[str]) -> None:
        """Calibrate and factorize only these layers from now on."""
        self.selected = [n for n in self.layers if n in set(names)]

    def chain(self) -> Chain:
        """The blocks' inputs, captured on the dense model the first time (with the glue layers'
        statistics), before anything is swapped."""
        if self._chain is None:
            glue = {n: self.layers[n] for n in self.glue}
            self._chain, self._glue_stats = capture(self.model, self.names, self.batches, glue=glue)
        return self._chain

    def fisher(self, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """:func:`~tdnn.statistics.sensitivity.fisher_weights` of ``layers`` on the dense model, kept
        in a keeping :class:`tdnn.Calibration`."""
        kept = self.calibration.fisher
        if any(n not in kept for n in layers):
            weights = fisher_weights(self.model, self.batches, layers)
            if not self.calibration.keep:
                return weights
            kept.update(weights)
        return {n: kept[n] for n in layers}

    def survey(self, measure: Callable[[str, InputStats], T]) -> dict[str, T]:
        """``measure(name, stats)`` of every selected layer on the dense model (one-shot statistics).
        Statistics small enough to keep serve a later one-shot :meth:`compress` of this call: the
        one-shot statistics of a layer are the same before and after other layers are replaced."""
        survey = _Survey(self.model, measure)
        self.compress(survey, sequential=False)
        self._surveyed = survey.kept
        return survey.results

    def compress(self, replacer: Replacer, *, sequential: bool, refine: Refine | None = None) -> list[BlockRefinement]:
        """``replacer.replace(name, stats)`` for every selected layer, block by block; with ``refine``,
        each block refined once its layers are; what each refinement did."""
        surveyed, self._surveyed = self._surveyed, None
        if refine is not None or sequential:  # statistics behind compressed blocks: passes of their own
            return self._passes(replacer, sequential, refine)
        if surveyed is not None and all(n in surveyed for n in self.selected):
            for name in self.selected:
                replacer.replace(name, surveyed[name])
            return []
        if not self.calibration.keep:
            return self._passes(replacer, sequential, None)
        kept = self.calibration.stats
        if any(self.layers[n][1] not in kept.get(n, {}) for n in self.selected):
            keep, self.selected = self.selected, list(self.layers)  # every layer: later calls find theirs
            self._passes(_Survey(self.model, self._keep), False, None)
            self.selected = keep
        for name in self.selected:
            replacer.replace(name, kept[name][self.layers[name][1]])
        return []

    def _keep(self, name: str, stats: InputStats) -> None:
        stats.keep = True  # the covariance outlives its square root: another call reads it again
        self.calibration.stats.setdefault(name, {})[self.layers[name][1]] = stats

    def _passes(self, replacer: Replacer, sequential: bool, refine: Refine | None) -> list[BlockRefinement]:
        compressor = BlockCompressor(self, replacer, sequential=sequential, refine=refine)
        compressor.run()
        for name in [n for n in self.glue if n in self.selected]:
            replacer.replace(name, self._glue_stats[name])
        return compressor.refined


def _trim() -> None:
    """Give the memory a block's statistics used back to the system: glibc keeps freed blocks of a
    few MB in its heap, where the next block's allocations fragment it (RSS creeping up block by
    block); ``malloc_trim`` returns every free page. A no-op where there is no glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None
