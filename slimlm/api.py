"""The Python API: analyze, prune, quantize, evaluate, save over a loaded model; the CLI calls these."""
from __future__ import annotations

import logging
import time

import torch

from slimlm.allocate import (ALLOCATOR_METRIC, allocate_from_metrics, allocation_metrics, fisher_metrics, holdout,
                             plan_budgets, round_bits)
from slimlm.analysis.activations import OWL_M, calibration_metrics
from slimlm.analysis.sensitivity import ERROR_LEVELS, FISHER_WINDOWS
from slimlm.analysis.spectra import model_weight_metrics
from slimlm.config import PruneConfig, QuantizeConfig
from slimlm.config.keywords import configure
from slimlm.core import data as data_mod, distributed, placement
from slimlm.core.architectures import linear_fqns
from slimlm.core.budgets import apply_overrides, layer_budgets, size_weighted_mean
from slimlm.core.calibration import adds_bos, calibration_for, check_tokens
from slimlm.core.engine import BlockIO, compress_blocks, compress_data_free
from slimlm.core.result import Result
from slimlm.core.timing import timed
from slimlm.errors import SlimlmError
from slimlm.evaluation.perplexity import perplexity
from slimlm.hooks import intactkv
from slimlm.hooks.runtime import RUNTIME_FILE, runtime_record
from slimlm.hooks.runtime import attach_ as attach_runtime_
from slimlm.pruning.methods import get_method
from slimlm.pruning.spec import PruneSpec, check_budget_options, check_sparsity, parse_pattern
from slimlm.quant.grids import QuantGrid
from slimlm.quant.methods import GPTQOptions, get_quantizer
from slimlm.quant.packing import storage_report
from slimlm.runs.resume import Checkpoint
from slimlm.runs.save import save_run, versions
from slimlm.transforms.outliers import transform_callbacks
from slimlm.transforms.rotate import rotate_

log = logging.getLogger(__name__)


def analyze(model, calib: torch.Tensor | None = None, owl_m: float = OWL_M, error_levels=ERROR_LEVELS,
            device: str = "cpu", batch_size: int | None = None, progress: bool = True,
            fisher: bool = True, fisher_method: str | None = None,
            timings: dict[str, float] | None = None) -> dict[str, dict]:
    """Per-linear metrics keyed by FQN: weight spectra always; with ``calib``, the activation metrics and (unless
    ``fisher=False``) the ``fisher`` loss tables of the first ``FISHER_WINDOWS`` windows, for the pruning method
    ``fisher_method`` (see ``fisher_metrics``). ``timings`` (if given) gets the seconds of each part: ``spectra``,
    ``calibration_pass``, ``error_tables``, ``owl`` (see ``calibration_metrics``), ``fisher_gradients``,
    ``fisher_tables`` and ``total``."""
    timings = {} if timings is None else timings
    with timed(timings, "total"):
        with timed(timings, "spectra"):
            metrics = model_weight_metrics(model, device, progress)
        if calib is not None:
            check_tokens(model, calib)
            for fqn, record in calibration_metrics(model, calib, owl_m, error_levels, device, batch_size, progress,
                                                   timings).items():
                metrics[fqn].update(record)
            if fisher:
                for fqn, record in fisher_metrics(model, calib, error_levels, progress, method=fisher_method,
                                                  timings=timings).items():
                    metrics[fqn].update(fisher=record["fisher"], fisher_for=record["fisher_for"])
    return metrics


DEFAULT_SPARSITY = 0.5  # Wanda and SparseGPT's headline setting


def prune(model, tokenizer=None, config: PruneConfig | None = None, *, calib: torch.Tensor | None = None,
          data_dir: str | None = None, device: str = "cpu", progress: bool = True, io: BlockIO | None = None,
          checkpoint: Checkpoint | None = None, **settings) -> Result:
    """Prune every linear inside the decoder blocks of ``model`` in place, as ``config`` (a ``PruneConfig``, or its
    fields as keywords: ``prune(model, tok, method="wanda", sparsity=0.5)``) says.

    ``sparsity`` is the global target (default 0.5): every layer gets it with ``allocation='uniform'``; other
    allocators (owl, alphapruning, errortable, fisher) spread it non-uniformly with the same parameter-weighted mean.
    ``budgets`` (FQN -> sparsity, a dict or a JSON file; layers it leaves out get ``sparsity``) replaces the
    allocator; ``override`` (regex -> sparsity, ``allocate.apply_overrides``) then sets the layers it matches.
    ``pattern`` 'N:M' fixes every layer at 1 - N/M and takes none of these. The manifest's ``sparsity_target`` is
    the requested target, with budgets or overrides the parameter-weighted mean of the per-layer targets applied.
    ``calib`` (token windows ``(n, seqlen)``) skips loading data. ``wbits`` also quantizes the kept weights (joint
    sparse + quantized; SparseGPT does it inside its OBS sweep), masks preserved. ``io`` streams the blocks from
    and to disk (``slimlm.runs.offload.ShardStream``, ``--offload disk``); ``checkpoint``
    (``slimlm.runs.resume.Checkpoint``) saves every finished block and resumes an interrupted run. Returns a
    ``Result`` whose manifest records the config, per-layer achieved sparsity and timings.
    """
    c = configure(PruneConfig, config, settings)
    m, layers = get_method(c.method), linear_fqns(model)
    nm, budgets = parse_pattern(c.pattern), c.budgets_map()
    check_budget_options(c.pattern, nm, c.sparsity, c.allocation, budgets, c.overrides(), layers)
    sparsity = 1 - nm[0] / nm[1] if nm is not None else DEFAULT_SPARSITY if c.sparsity is None else c.sparsity
    if io is not None and budgets is None and c.allocation != "uniform" and nm is None:
        raise SlimlmError(f"allocation '{c.allocation}' needs the whole model in memory; with --offload disk use "
                          "--allocation uniform or a --budgets map")
    torch.manual_seed(c.seed)
    start, calib_info, timings, check = time.perf_counter(), None, {}, None
    allocating = budgets is None and c.allocation != "uniform" and nm is None
    if m.needs_data or ALLOCATOR_METRIC.get(c.allocation) in ("owl_lod", "errors", "fisher") or (
            allocating and c.holdout):
        with timed(timings, "data"):
            calib, calib_info = _calibration(model, tokenizer, calib, c, data_dir, allocating)
    if allocating:
        with timed(timings, "allocation"):
            calib, reference = holdout.hold_out(model, calib, calib_info, c.holdout)
            budgets = plan_budgets(model, c.allocation, sparsity, calib, c.owl_m, device, c.batch_size, progress,
                                   c.method, **c.allocation_options())
            if reference is not None:
                budgets, check = holdout.check_sparsity(model, budgets, sparsity, calib, reference,
                                                        c.allocation in holdout.SELECTING, progress)
    targets = layer_budgets(layers, sparsity, budgets, c.overrides())
    for value in targets.values():
        check_sparsity(value)
    achieved, perms, engine = _run_prune(model, c, m, targets, calib, device, progress, io, checkpoint)
    timings |= engine.timings
    timings["total"] = time.perf_counter() - start
    result = _prune_result(model, c, m, sparsity, targets, achieved, perms, engine, calib_info, device, timings)
    if check is not None:
        result.manifest["allocation"]["check"] = check
    return _with_resume(result, checkpoint)


def _calibration(model, tokenizer, calib, c, data_dir, allocating: bool):
    """``calibration_for``, refusing in one line where only the allocation check needs windows and none can be
    read (a data-free method called without a tokenizer)."""
    if calib is None and tokenizer is None and allocating and c.holdout:
        raise SlimlmError(f"the allocation check measures '{c.allocation}' against uniform budgets on held-out "
                          "calibration windows: pass a tokenizer or calib, or holdout=0 to skip the check")
    return calibration_for(model, tokenizer, calib, c, data_dir)


def _with_resume(result: Result, checkpoint: Checkpoint | None) -> Result:
    """A resumed run's manifest lists every process that worked on it (where each started, its seconds), and its
    total seconds are theirs together."""
    if checkpoint is not None and checkpoint.earlier:
        result.manifest["resumed"] = checkpoint.processes()
        result.manifest["timings"]["total"] += sum(p["seconds"] for p in checkpoint.earlier)
    return result


def _fisher_windows(allocation: str, calib_info: dict | None) -> dict:
    """The windows the Fisher allocator read: the first ``FISHER_WINDOWS`` of the calibration windows it plans on."""
    if allocation != "fisher" or calib_info is None:
        return {}
    return {"fisher_windows": min(FISHER_WINDOWS, calib_info["nsamples"] - calib_info.get("held_out", 0))}


def _run_prune(model, c: PruneConfig, m, targets, calib, device, progress, io, checkpoint):
    """The block loop of ``prune``: per-layer achieved sparsity, N:M permutations and the engine's report (a
    checkpoint saves the first two with each block and refills them on resume)."""
    grid = None if c.wbits is None else c.grid(c.wbits)
    spec = PruneSpec(nm=parse_pattern(c.pattern), group=c.group, permute=c.permute, ria_alpha=c.ria_alpha,
                     blocksize=c.blocksize, damp=c.damp, grid=grid)
    achieved, perms = (checkpoint.records, checkpoint.tensors) if checkpoint is not None else ({}, {})

    def compress(group, stats):
        for fqn, linear in group.items():
            new, mask, perm = m.fn(linear.weight.data, stats, targets[fqn], spec)
            linear.weight.data.copy_(new)
            achieved[fqn] = {"target": targets[fqn], "sparsity": (new == 0).float().mean().item()}
            if perm is not None:
                perms[fqn] = perm.cpu()
        return True

    if m.needs_data:
        engine = compress_blocks(model, calib, compress, set(targets), hessian=m.needs_hessian, device=device,
                                 batch_size=c.batch_size, progress=progress, io=io, checkpoint=checkpoint,
                                 results=(achieved, perms))
    else:
        engine = compress_data_free(model, compress, set(targets), io, checkpoint, progress, (achieved, perms))
    return achieved, perms, engine


def _prune_result(model, c: PruneConfig, m, sparsity, targets, achieved, perms, engine, calib_info, device,
                  timings) -> Result:
    layers = linear_fqns(model)
    sizes = {f: lin.weight.numel() for f, lin in layers.items()}
    zeros = sum(achieved[f]["sparsity"] * sizes[f] for f in achieved)
    user_map = c.budgets is not None  # the per-layer targets come from the caller, not from an allocator
    manifest = {
        "kind": "prune", "method": c.method, "pattern": c.pattern, "group": c.group or m.default_group,
        "permute": c.permute,
        "sparsity_target": size_weighted_mean(targets, sizes) if user_map or c.override else sparsity,
        "sparsity": zeros / sum(sizes[f] for f in achieved),
        "allocation": {"name": "budgets" if user_map else c.allocation, **c.allocation_options(),
                       **({} if user_map else _fisher_windows(c.allocation, calib_info)),
                       **({"file": c.budgets} if isinstance(c.budgets, str) else {}),
                       **({"overrides": c.overrides()} if c.override else {})},
        "config": c.in_effect(), "calibration": calib_info, "block_inputs": engine.block_inputs,
        "device": placement.describe(device), "seed": c.seed, **distributed.record(), "timings": timings,
        "versions": versions(), "layers": achieved,
    }
    if c.wbits is not None:
        grid = c.grid(c.wbits)
        manifest["quantization"] = {"wbits": c.wbits, "group_size": grid.group_size, "symmetric": grid.symmetric,
                                    "scale_dtype": c.scale_dtype}
        manifest["storage"] = storage_report(model, {f: grid for f in achieved},
                                             {f: 1 - achieved[f]["sparsity"] for f in achieved})
    return Result(manifest, {"nm_permutations.safetensors": perms} if perms else {})


def _by_grid(grids: dict[str, QuantGrid], group: dict) -> dict[QuantGrid, list[str]]:
    """The FQNs of ``group`` by their grid (mixed precision can give q, k and v different bit-widths)."""
    by_grid: dict[QuantGrid, list[str]] = {}
    for fqn in group:
        by_grid.setdefault(grids[fqn], []).append(fqn)
    return by_grid


def quantize(model, tokenizer=None, config: QuantizeConfig | None = None, *, calib: torch.Tensor | None = None,
             data_dir: str | None = None, device: str = "cpu", progress: bool = True, io: BlockIO | None = None,
             checkpoint: Checkpoint | None = None, **settings) -> Result:
    """Quantize the weights of every decoder-block linear in place (simulated: weights stay float on the grid), as
    ``config`` (a ``QuantizeConfig``, or its fields as keywords) says: validate, plan the bits, run the block loop,
    record.

    ``method``: a name in ``quant.methods.QUANTIZERS`` ('rtn', data-free, or 'gptq'). ``avg_bits`` with an
    ``allocation`` gives per-layer bit-widths (integers from 2..8) whose parameter-weighted mean stays at or under
    ``avg_bits``; ``override`` (regex -> bits) then sets the layers it matches. ``scale_dtype='float16'`` rounds
    scales to float16 so that GGUF export is exact (see quant.grids.float16_scales). ``io`` and ``checkpoint``
    stream blocks from and to disk and make the run resumable, as in ``prune``. ``one_pass`` calibrates every block
    on the dense model's activations (``core.engine.compress_blocks``).

    Weight-activation quantization: ``abits`` (per token), ``kvbits`` (KV cache per head and token), ``transform``
    (``smoothquant``, ``duquant`` [``lwc``], ``flatquant``: ``transforms.outliers``; ``alpha``, ``epochs``),
    ``weight_clip``, ``act_clip``, ``act_grid``, ``kv_clip`` (None: the transform's defaults,
    ``hooks.runtime.DEFAULTS``), ``intact_kv`` ('bos' or 'prefix' with ``intact_prefix``: ``hooks.intactkv``;
    ``calibrate_kv`` tunes its cache on the calibration windows, IntactKV+Cal). The result's tensors hold what a
    reloaded model needs to compute the same thing (``apply_runtime``).
    """
    c = configure(QuantizeConfig, config, settings)
    runtime = c.runtime()
    runtime.check(model, c.rotate == "hadamard", io is not None, checkpoint is not None)
    pivot_ids = intactkv.pivot_tokens(tokenizer, c.intact_kv, c.intact_prefix) if c.intact_kv else None
    apply_overrides(dict.fromkeys(linear_fqns(model)), c.overrides())  # a regex that matches no layer fails here
    if io is not None and c.avg_bits is not None and c.allocation != "uniform":
        raise SlimlmError("--offload disk quantizes weights block by block only: no --avg-bits with a non-uniform "
                          "allocation")
    torch.manual_seed(c.seed)
    start, timings, calib_info = time.perf_counter(), {}, None
    rotation = rotate_(model, seed=c.seed, progress=progress) if c.rotate == "hadamard" else None
    pivots = intactkv.pivot_cache(model, pivot_ids) if pivot_ids else None  # full precision, before rounding
    allocating = c.avg_bits is not None and c.allocation != "uniform"
    if get_quantizer(c.method).needs_data or c.transform != "none" or c.calibrate_kv or (
            allocating and (ALLOCATOR_METRIC.get(c.allocation) in ("owl_lod", "fisher") or c.holdout)):
        calib, calib_info = _calibration(model, tokenizer, calib, c, data_dir, allocating)
    bits, calib, check = _plan_bits(model, c, calib, calib_info, device, progress)
    reference = intactkv.reference_outputs(model, calib, pivots) if c.calibrate_kv else None
    grids = {fqn: c.grid(b, runtime.weight_clip) for fqn, b in bits.items()}
    losses, sites, learned, engine = _run_quantize(model, c, runtime, grids, calib, device, progress, io, checkpoint)
    timings |= engine.timings
    entries, tensors = runtime_record(runtime, c.seed, sites, pivots, pivot_ids, learned)
    attach_runtime_(model, {"abits": c.abits, "act_clip": runtime.act_clip, **entries}, tensors)
    if reference is not None:  # the quantized model's pivot cache, tuned to its layer outputs
        tensors |= intactkv.to_tensors(intactkv.calibrate_(model, reference, calib, intactkv.from_tensors(tensors),
                                                           progress=progress))
        entries["intact_kv"]["calibrated"] = True
    timings["total"] = time.perf_counter() - start
    manifest = _quantize_manifest(model, c, runtime, rotation, entries, bits, grids, losses, engine, calib_info,
                                  device, timings)
    if check is not None:
        manifest["allocation"]["check"] = check
    return _with_resume(Result(manifest, {RUNTIME_FILE: tensors} if tensors else {}), checkpoint)


def _plan_bits(model, c: QuantizeConfig, calib, calib_info, device, progress):
    """Each linear's bit-width: ``wbits``, or an allocation at ``avg_bits`` (checked against uniform bits on held-out
    windows, ``allocate.holdout``); then the overrides. Returns (bits, the windows left for the method, the check's
    record or None)."""
    layers = linear_fqns(model)
    bits = {fqn: c.wbits for fqn in layers}
    check = None
    if c.avg_bits is not None:
        calib, reference = holdout.hold_out(model, calib, calib_info, c.holdout if c.allocation != "uniform" else 0)
        metrics = allocation_metrics(model, c.allocation, calib, device, c.batch_size, progress,
                                     grid=c.grid(c.wbits))
        continuous = allocate_from_metrics(metrics, c.allocation, c.avg_bits, "bits", **c.allocation_options())
        bits = round_bits(continuous, {f: layers[f].weight.numel() for f in layers})
        if reference is not None:
            bits, check = holdout.check_bits(model, continuous, c.avg_bits, c.grid, reference,
                                             c.allocation in holdout.SELECTING, progress)
    return apply_overrides(bits, c.overrides()), calib, check


def _run_quantize(model, c: QuantizeConfig, runtime, grids, calib, device, progress, io, checkpoint):
    """The block loop of ``quantize``: per-layer GPTQ losses, the transforms' sites and learned tensors, and the
    engine's report."""
    quantizer = get_quantizer(c.method)
    losses = checkpoint.records if checkpoint is not None else {}  # saved with each block, refilled on resume
    options = GPTQOptions(c.blocksize, c.damp, c.act_order)

    def compress(group, stats):
        for grid, fqns in _by_grid(grids, group).items():
            weights = [group[fqn].weight.data for fqn in fqns]
            for fqn, W, Q, loss in zip(fqns, weights, *quantizer.fn(weights, stats, grid, options)):
                W.copy_(Q)
                if loss is not None:
                    losses[fqn] = loss
        return True

    sites, learned, prepare = {}, {}, None
    if c.transform != "none":
        compress, prepare = transform_callbacks(model, runtime, c.grid(c.wbits), compress, sites, learned, c.seed,
                                                c.epochs)
    if quantizer.needs_data or c.transform != "none":
        engine = compress_blocks(model, calib, compress, set(grids), hessian=quantizer.needs_data, device=device,
                                 batch_size=c.batch_size, progress=progress, io=io, checkpoint=checkpoint,
                                 sequential=not c.one_pass, window_mean=c.transform == "duquant", prepare=prepare,
                                 results=(losses,))
    else:
        engine = compress_data_free(model, compress, set(grids), io, checkpoint, progress, (losses,))
    return losses, sites, learned, engine


def _quantize_manifest(model, c: QuantizeConfig, runtime, rotation, entries, bits, grids, losses, engine,
                       calib_info, device, timings) -> dict:
    layers = linear_fqns(model)
    grid = c.grid(c.wbits)
    return {
        "kind": "quantize", "method": c.method, "wbits": c.wbits, "group_size": grid.group_size,
        "symmetric": grid.symmetric, "scale_dtype": c.scale_dtype, "act_order": c.act_order, "abits": c.abits,
        "act_clip": runtime.act_clip, "rotation": rotation, **entries,
        # achieved parameter-weighted mean bit-width (mixed precision stays at or under avg_bits)
        "bits": sum(bits[f] * layers[f].weight.numel() for f in layers)
        / sum(lin.weight.numel() for lin in layers.values()),
        "allocation": {"name": c.allocation, "avg_bits": c.avg_bits, **c.allocation_options(),
                       **(_fisher_windows(c.allocation, calib_info) if c.avg_bits is not None else {}),
                       **({"overrides": c.overrides()} if c.override else {})}, "config": c.in_effect(),
        "calibration": calib_info, "block_inputs": engine.block_inputs, "device": placement.describe(device),
        "seed": c.seed, **distributed.record(), "timings": timings, "versions": versions(),
        "layers": {f: {"bits": bits[f], **({"gptq_loss": losses[f]} if f in losses else {})} for f in layers},
        "storage": storage_report(model, grids),
    }


def evaluate(model, tokenizer, source: str = "wikitext2", seqlen: int = 2048, windows: int | None = None,
             data_dir: str | None = None, device: str = "cpu", batch_size: int = 1,
             progress: bool = True) -> dict:
    """WikiText-2 (or other) test perplexity with non-overlapping windows; returns a JSON-able dict. ``windows``
    limits it to the first N (default: all, the protocol); with ``progress``, the plan and an estimate of its time
    are logged first."""
    if seqlen < 2:
        raise SlimlmError(f"evaluation windows need at least 2 tokens (--eval-seqlen), got {seqlen}")
    if windows is not None and windows < 1:
        raise SlimlmError(f"the number of evaluation windows (--eval-windows) must be at least 1, got {windows}")
    tokens = data_mod.tokenize(data_mod.load_text(source, "test", data_dir), tokenizer)
    ids = check_tokens(model, data_mod.eval_windows(tokens, seqlen, windows))
    if progress:
        available = tokens.numel() // seqlen
        log.info("perplexity on %s: %d windows x %d tokens = %d tokens (%s)", source, len(ids), seqlen, ids.numel(),
                 f"the first {len(ids)} of {available}" if len(ids) < available
                 else "every window of the test text; --eval-windows N, or windows=N in Python, evaluates fewer")
    result = perplexity(model, ids, device, batch_size, progress)
    return {"dataset": source, "perplexity": result.perplexity, "nll": result.nll, "windows": result.windows,
            "seqlen": result.seqlen, "tokens_per_s": result.tokens_per_s, "seconds": result.seconds,
            "bos_added": adds_bos(tokenizer)}


def save(model, tokenizer, out, result: Result, overwrite: bool = False):
    """Write ``out`` atomically: safetensors model, tokenizer, ``slimlm.json``, extra tensors and text files."""
    return save_run(model, tokenizer, out, result.manifest, overwrite, result.tensors, result.files)
