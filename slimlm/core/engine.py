"""The block-by-block calibration loop, written once and shared by every method.

Shape of the loop (GPTQ/SparseGPT/Wanda papers' sequential scheme):
  1. run the model's embedding part on the calibration windows and capture what block 0 receives;
     the keyword arguments every block receives (rotary ``position_embeddings``, masks, position ids)
     are captured generically from the model's own forward, so no architecture is special-cased;
  2. for each block: move it to the compute device, forward all windows with hooks that accumulate
     the input statistics each linear needs (``LayerStats``), call the compression function once per
     set of linears that read the same input (q/k/v, gate/up share one ``LayerStats``), re-run the
     block with the compressed weights to get the next block's inputs (the papers' default: later
     blocks calibrate on the compressed model's activations), move it back.
Only one block is on the compute device at a time; activations stay there between blocks.
Under ``torchrun`` each process runs this loop on its share of the windows and the statistics and compressed
weights are exchanged between steps 2's passes (``core.distributed``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from slimlm.core import distributed, placement
from slimlm.core.architectures import adapter_for, block_linears, decoder_blocks
from slimlm.core.stats import Accumulator, LayerStats
from slimlm.errors import SlimlmError

log = logging.getLogger(__name__)


DEFAULT_BATCH_TOKENS = 2048  # windows per forward = this // seqlen; measured faster and leaner than 8192 on CPU


@dataclass
class Captured:
    """Block-0 inputs ``(n, T, hidden)`` and, per block and batch size, the other call arguments."""

    hidden: torch.Tensor
    call_args: list[dict[int, tuple[tuple, dict]]] = field(default_factory=list)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _batches(n: int, batch_size: int):
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


@torch.no_grad()
def capture_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int, device) -> Captured:
    """Run the embedding part of the model and record what each block is called with.

    Every block's ``forward`` is swapped for a stub that records its arguments and passes the hidden
    states through unchanged, so the capture costs no block compute; the base model (no LM head) runs.
    Call arguments do not depend on hidden-state values, only on the batch shape, so they are kept
    once per batch size (references to tensors shared by all blocks, so little memory).
    """
    blocks = decoder_blocks(model)
    captured = Captured(hidden=None, call_args=[{} for _ in blocks])
    hidden = []

    def stub_for(i):
        def stub(hidden_states, *args, **kwargs):
            if i == 0:
                hidden.append(hidden_states.to(device))
            captured.call_args[i].setdefault(hidden_states.shape[0], _to((args, kwargs), device))
            return hidden_states
        return stub

    for i, block in enumerate(blocks):
        block.forward = stub_for(i)
    try:
        model_device = next(model.parameters()).device
        for s, e in _batches(windows.shape[0], batch_size):
            model.base_model(input_ids=windows[s:e].to(model_device), use_cache=False)
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward
    captured.hidden = torch.cat(hidden)
    return captured


@torch.no_grad()
def run_block(block: nn.Module, inputs: torch.Tensor, call_args: dict, batch_size: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Forward every window through one block; returns ``(n, T, hidden)``."""
    out = torch.empty_like(inputs) if out is None else out
    for s, e in _batches(inputs.shape[0], batch_size):
        args, kwargs = call_args[e - s]
        y = block(inputs[s:e], *args, **kwargs)
        out[s:e] = y[0] if isinstance(y, tuple) else y  # transformers<5 blocks return tuples
    return out


def _collect_stats(linears: dict[str, nn.Linear], hessian: bool, window_mean: bool = False):
    """Hook each linear to accumulate input statistics; linears fed the same tensor (q/k/v,
    gate/up) share one accumulator, so each statistic is computed once per distinct input."""
    accs: dict[str, Accumulator] = {}
    last = {"x": None, "acc": None}

    def hook_for(name):
        def hook(module, inputs, output):
            x = inputs[0]
            if name not in accs:
                if last["x"] is x:
                    accs[name] = last["acc"]
                else:
                    accs[name] = Accumulator(x.shape[-1], hessian, x.device, window_mean)
            if last["x"] is not x:
                accs[name].add(x)
            last["x"], last["acc"] = x, accs[name]
        return hook

    handles = [lin.register_forward_hook(hook_for(n)) for n, lin in linears.items()]
    return accs, handles, last


# compress({fqn: linear} of linears reading one input, their shared statistics) -> whether weights changed
CompressFn = Callable[[dict[str, nn.Linear], LayerStats | None], bool]


def _by_input(linears: dict[str, nn.Linear], accs: dict[str, Accumulator]):
    """[(statistics, {fqn: linear})] with one entry per distinct input, in the block's order."""
    groups: dict[int, tuple[LayerStats, dict[str, nn.Linear]]] = {}
    for fqn, lin in linears.items():
        groups.setdefault(id(accs[fqn]), (accs[fqn].stats(), {}))[1][fqn] = lin
    return list(groups.values())


class BlockIO(Protocol):
    """Where block weights live outside their turn (``--offload disk``: ``slimlm.runs.offload.ShardStream``).

    ``load(i, block)`` materialises block i just before it is used; ``store(i, block)`` takes it once it is
    compressed (writes it out and frees it), so only one block's weights are in memory at a time.
    """

    def load(self, i: int, block: nn.Module) -> None: ...

    def store(self, i: int, block: nn.Module) -> None: ...


@dataclass(frozen=True)
class BlockRun:
    """What the block loop did: seconds per part, and the activations each block was calibrated on
    (``compressed``: the outputs of the already compressed blocks before it; ``dense``: the dense model's; None:
    no calibration pass)."""

    timings: dict[str, float]
    block_inputs: str | None


class BlockCheckpoint(Protocol):
    """Where finished blocks are saved, so that an interrupted run resumes (``slimlm.runs.resume.Checkpoint``).

    ``restore(blocks)`` loads the blocks an earlier run finished and returns the first block still to do and its
    inputs (None when not saved: data-free runs); ``save(i, block, activations)`` records block i as finished,
    with the next block's inputs.
    """

    def restore(self, blocks) -> tuple[int, torch.Tensor | None]: ...

    def save(self, i: int, block: nn.Module, activations: torch.Tensor | None) -> None: ...


def compress_blocks(model: nn.Module, windows: torch.Tensor, compress: CompressFn, targets: set[str],
                    hessian: bool = False, device: str | torch.device = "cpu",
                    batch_size: int | None = None, progress: bool = True, io: BlockIO | None = None,
                    checkpoint: BlockCheckpoint | None = None, sequential: bool = True,
                    window_mean: bool = False, prepare: Callable | None = None,
                    results: tuple[dict, ...] = ()) -> BlockRun:
    """Calibrate and compress ``model`` in place, block by block.

    ``compress({fqn: linear}, stats) -> bool`` is called once per set of linears in ``targets`` that read the
    same input (q/k/v, gate/up; every other linear alone), with their shared statistics, so a method can share
    work across them (GPTQ sweeps their stacked rows once); it changes the weights in place and returns whether
    it changed any. ``hessian`` asks for the (in, in) Hessian besides the channel norms, ``window_mean`` for
    the input averaged over windows (``LayerStats.window_mean``). ``prepare(i, block, inputs, outputs,
    call_args, stats)``, if given, runs after the statistics pass and before ``compress``: block-level
    calibration such as FlatQuant's training (``outputs``: the block's outputs before any change; ``stats``:
    {fqn: LayerStats}). ``io`` streams block weights in and out (see ``BlockIO``); ``checkpoint`` saves each
    finished block and the next block's inputs, and restarts after the last finished block of an interrupted
    run. Returns a ``BlockRun``: timings (seconds) ``capture``, ``forward`` (all block passes), ``compress``, and
    under torchrun ``communicate`` (all-reduces and broadcasts), and which activations each block was calibrated
    on. ``results`` are the dicts that ``compress`` adds its per-layer
    results to: under torchrun each set of linears is compressed on one rank only, and what it added there is
    copied into every rank's dicts (``core.distributed.share``).

    ``sequential`` (the GPTQ/SparseGPT/Wanda reference code's choice): each block is calibrated on the outputs
    of the already compressed blocks before it, which costs a second pass per block. ``sequential=False``
    propagates the statistics pass's own outputs, so every block sees the dense model's activations: one pass,
    about half the forward time, and errors of earlier blocks are not compensated downstream. Block-level training
    (``prepare``) always calibrates on the dense model's activations: its target is the full-precision block's
    output for the full-precision block's input (how slimlm trains FlatQuant and DuQuant+LWC).
    """
    sequential = sequential and prepare is None
    spread = placement.devices()  # --device-map: each block over these devices (core.placement)
    device = spread[0] if spread else distributed.local_device(device)
    n, seqlen = windows.shape
    batch_size = batch_size or max(1, DEFAULT_BATCH_TOKENS // seqlen)
    if prepare is not None and distributed.world() > 1:
        raise SlimlmError("block-level training (transforms) runs in one process; start it without torchrun")
    distributed.check_same(f"{sorted(targets)} {hessian} {sequential} {batch_size} "
                           f"{distributed.digest(windows)}", "calibration windows or layers")
    prefix = adapter_for(model).blocks
    t0 = time.perf_counter()
    windows, batch_size = distributed.shard_windows(windows, batch_size)
    captured = capture_inputs(model, windows, batch_size, device)
    timing = {"capture": time.perf_counter() - t0, "forward": 0.0, "compress": 0.0}
    if distributed.world() > 1:
        timing["communicate"] = 0.0
    blocks = decoder_blocks(model)
    start, saved = checkpoint.restore(blocks) if checkpoint is not None else (0, None)
    x = captured.hidden if saved is None else saved.to(device)  # block `start`'s inputs, as first computed
    y = torch.empty_like(x)
    for i in tqdm(range(start, len(blocks)), desc="blocks", initial=start, total=len(blocks),
                  disable=not progress):
        block = blocks[i]
        if io is not None:
            io.load(i, block)
        placement.dispatch_(block, spread, hessian) if spread else block.to(device)
        linears = {f"{prefix}.{i}.{name}": lin for name, lin in block_linears(block).items()}
        linears = {fqn: lin for fqn, lin in linears.items() if fqn in targets}
        accs, handles, last = _collect_stats(linears, hessian, window_mean)
        t = time.perf_counter()
        try:
            run_block(block, x, captured.call_args[i], batch_size, out=y)
        finally:
            for h in handles:
                h.remove()
            last.clear()
        timing["forward"] += time.perf_counter() - t
        _communicate(timing, distributed.reduce_accumulators, list(accs.values()))
        t = time.perf_counter()
        if prepare is not None:
            prepare(i, block, x, y, captured.call_args[i], {fqn: accs[fqn].stats() for fqn in linears})
        groups, before = _by_input(linears, accs), [set(d) for d in results]
        # every set once, spread over the ranks
        done = [distributed.owns(k) and bool(compress(g, stats)) for k, (stats, g) in enumerate(groups)]
        accs.clear()
        timing["compress"] += time.perf_counter() - t
        changed = _communicate(timing, distributed.share, [g for _, g in groups], results, before, done)
        changed |= prepare is not None
        if changed and sequential:  # the statistics pass gave dense outputs: recompute with compressed weights
            t = time.perf_counter()
            run_block(block, x, captured.call_args[i], batch_size, out=y)
            timing["forward"] += time.perf_counter() - t
        if not torch.isfinite(y).all():
            raise SlimlmError(f"non-finite activations after block {i}; check the model and dtype")
        placement.release_(block) if spread else block.to("cpu")
        if io is not None:
            io.store(i, block)
        if checkpoint is not None:
            checkpoint.save(i, block, y)
        x, y = y, x
    return BlockRun(timing, "compressed" if sequential else "dense")


def _communicate(timing: dict, fn, *args):
    """Run a ``core.distributed`` exchange, timing it under torchrun (a no-op in one process)."""
    t = time.perf_counter()
    result = fn(*args)
    if "communicate" in timing:
        timing["communicate"] += time.perf_counter() - t
    return result


def compress_data_free(model: nn.Module, compress: CompressFn, targets: set[str], io: BlockIO | None = None,
                       checkpoint: BlockCheckpoint | None = None, progress: bool = True,
                       results: tuple[dict, ...] = ()) -> BlockRun:
    """Data-free methods (magnitude, RTN): the same ``compress`` callback, called for each linear alone with
    ``stats=None`` and no calibration pass, block by block so that ``io``, ``checkpoint`` and torchrun work as in
    ``compress_blocks`` (each rank rounds its share of the linears). Returns timings ``{"compress": seconds}``
    and no block inputs."""
    start = time.perf_counter()
    if placement.devices():
        raise SlimlmError("--device-map spreads calibrated blocks over devices; data-free methods (magnitude, RTN) "
                          "round each weight on the CPU: run them without it")
    distributed.check_same(str(sorted(targets)), "layers")
    prefix = adapter_for(model).blocks
    blocks = decoder_blocks(model)
    first = checkpoint.restore(blocks)[0] if checkpoint is not None else 0
    for i in tqdm(range(first, len(blocks)), desc="blocks", initial=first, total=len(blocks),
                  disable=not progress):
        if io is not None:
            io.load(i, blocks[i])
        linears = {f"{prefix}.{i}.{name}": lin for name, lin in block_linears(blocks[i]).items()}
        groups, before = [{fqn: lin} for fqn, lin in linears.items() if fqn in targets], [set(d) for d in results]
        done = [distributed.owns(k) and bool(compress(group, None)) for k, group in enumerate(groups)]
        distributed.share(groups, results, before, done)
        if io is not None:
            io.store(i, blocks[i])
        if checkpoint is not None:
            checkpoint.save(i, blocks[i], None)
    return BlockRun({"compress": time.perf_counter() - start}, None)
