"""The Python API: analyze, prune, quantize, evaluate, save over a loaded model; the CLI calls these."""
from __future__ import annotations

import logging
import time

import torch

from slimlm.allocate import (ALLOCATOR_METRIC, ALLOCATORS, allocate_from_metrics, allocation_metrics, fisher_metrics,
                             plan_budgets, round_bits)
from slimlm.analysis.activations import OWL_M, calibration_metrics
from slimlm.analysis.sensitivity import ERROR_LEVELS
from slimlm.analysis.spectra import model_weight_metrics
from slimlm.core import data as data_mod, distributed, placement
from slimlm.core.architectures import linear_fqns
from slimlm.core.budgets import apply_overrides, layer_budgets, size_weighted_mean
from slimlm.core.calibration import adds_bos, calibration_for, check_tokens
from slimlm.core.engine import BlockIO, compress_blocks, compress_data_free
from slimlm.core.result import Result
from slimlm.core.timing import timed
from slimlm.errors import SlimlmError, unknown
from slimlm.evaluation.perplexity import perplexity
from slimlm.hooks import intactkv
from slimlm.hooks.runtime import RUNTIME_FILE, Runtime, runtime_record
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


DEFAULT_SPARSITY = 0.5


def prune(model, tokenizer=None, method: str = "wanda", sparsity: float | None = None, pattern: str | None = None,
          group: str | None = None, permute: bool = False, budgets: dict[str, float] | None = None,
          overrides: dict[str, float] | None = None, allocation: str = "uniform",
          allocation_options: dict | None = None, owl_m: float = OWL_M,
          calib: torch.Tensor | None = None, calib_source: str = "wikitext2", nsamples: int = 128,
          seqlen: int = 2048, sampling: str = "random", seed: int = 0, data_dir: str | None = None,
          device: str = "cpu", batch_size: int | None = None, ria_alpha: float = 0.5,
          blocksize: int = 128, damp: float = 0.01, wbits: int | None = None, group_size: int | None = 128,
          symmetric: bool = True, scale_dtype: str | None = None, progress: bool = True,
          io: BlockIO | None = None, checkpoint: Checkpoint | None = None) -> Result:
    """Prune every linear inside the decoder blocks of ``model`` in place.

    ``sparsity`` is the global target (default 0.5): every layer gets it with ``allocation='uniform'``; other
    allocators (owl, alphapruning, errortable, fisher) spread it non-uniformly with the same parameter-weighted mean.
    ``budgets`` (FQN -> sparsity; layers it leaves out get ``sparsity``) replaces the allocator; ``overrides``
    (regex -> sparsity, ``core.budgets.apply_overrides``) then set the layers they match. ``pattern`` 'N:M' fixes
    every layer at 1 - N/M and takes none of these. The manifest's ``sparsity_target`` is the requested target,
    with budgets or overrides the parameter-weighted mean of the per-layer targets applied.
    ``calib`` (token windows ``(n, seqlen)``) skips loading data. ``wbits`` also quantizes the kept
    weights (joint sparse + quantized; SparseGPT does it inside its OBS sweep), masks preserved;
    ``scale_dtype='float16'`` rounds its scales to float16 (exact GGUF export, see quant.grids.float16_scales).
    ``io`` streams the blocks from and to disk (``slimlm.runs.offload.ShardStream``, ``--offload disk``);
    ``checkpoint`` (``slimlm.runs.resume.Checkpoint``) saves every finished block and resumes an interrupted run.
    Returns a ``Result`` whose manifest records per-layer achieved sparsity, settings and timings.
    """
    m = get_method(method)
    grid = None if wbits is None else QuantGrid(wbits, symmetric, group_size, scale_dtype=scale_dtype)
    spec = PruneSpec(nm=parse_pattern(pattern), group=group, permute=permute, ria_alpha=ria_alpha,
                     blocksize=blocksize, damp=damp, grid=grid)
    layers = linear_fqns(model)
    check_budget_options(pattern, spec.nm, sparsity, allocation, budgets, overrides, layers)
    user_map = budgets is not None  # the per-layer targets come from the caller, not from an allocator
    sparsity = check_sparsity(DEFAULT_SPARSITY if sparsity is None else sparsity)
    if spec.nm is not None:
        sparsity = 1 - spec.nm[0] / spec.nm[1]
    if allocation not in ALLOCATORS:
        raise unknown("allocation", allocation, ALLOCATORS)
    if io is not None and budgets is None and allocation != "uniform" and spec.nm is None:
        raise SlimlmError(f"allocation '{allocation}' needs the whole model in memory; with --offload disk use "
                          "--allocation uniform or a --budgets map")
    torch.manual_seed(seed)
    start = time.perf_counter()
    calib_info, timings = None, {}
    if m.needs_data or ALLOCATOR_METRIC.get(allocation) in ("owl_lod", "errors", "fisher"):
        t = time.perf_counter()
        calib, calib_info = calibration_for(model, tokenizer, calib, calib_source, nsamples, seqlen, sampling,
                                            seed, data_dir)
        timings["data"] = time.perf_counter() - t
    if budgets is None and allocation != "uniform" and spec.nm is None:
        t = time.perf_counter()
        budgets = plan_budgets(model, allocation, sparsity, calib, owl_m, device, batch_size, progress, method,
                               **(allocation_options or {}))
        timings["allocation"] = time.perf_counter() - t
    budgets = layer_budgets(layers, sparsity, budgets, overrides)
    for value in budgets.values():
        check_sparsity(value)
    # per-layer results; a checkpoint saves them with each block and refills them on resume
    achieved, perms = (checkpoint.records, checkpoint.tensors) if checkpoint is not None else ({}, {})

    def compress(group, stats):
        for fqn, linear in group.items():
            new, mask, perm = m.fn(linear.weight.data, stats, budgets[fqn], spec)
            linear.weight.data.copy_(new)
            achieved[fqn] = {"target": budgets[fqn], "sparsity": (new == 0).float().mean().item()}
            if perm is not None:
                perms[fqn] = perm.cpu()
        return True

    if m.needs_data:
        timings |= compress_blocks(model, calib, compress, set(budgets), hessian=m.needs_hessian,
                                   device=device, batch_size=batch_size, progress=progress, io=io,
                                   checkpoint=checkpoint, results=(achieved, perms))
    else:
        timings |= compress_data_free(model, compress, set(budgets), io, checkpoint, progress, (achieved, perms))
    timings["total"] = time.perf_counter() - start
    total = sum(layers[f].weight.numel() for f in achieved)
    zeros = sum(achieved[f]["sparsity"] * layers[f].weight.numel() for f in achieved)
    sizes = {f: lin.weight.numel() for f, lin in layers.items()}
    allocation_record = {"name": "budgets" if user_map else allocation, "owl_m": owl_m,
                         **(allocation_options or {}), **({"overrides": overrides} if overrides else {})}
    manifest = {
        "kind": "prune", "method": method, "pattern": pattern or "unstructured",
        "group": group or m.default_group, "permute": permute,
        "sparsity_target": size_weighted_mean(budgets, sizes) if user_map or overrides else sparsity,
        "sparsity": zeros / total, "allocation": allocation_record,
        "options": {"ria_alpha": ria_alpha, "blocksize": blocksize, "damp": damp},
        "calibration": calib_info, "device": placement.describe(device), "seed": seed, **distributed.record(),
        "timings": timings, "versions": versions(), "layers": achieved,
    }
    if grid is not None:
        manifest["quantization"] = {"wbits": wbits, "group_size": group_size, "symmetric": symmetric,
                                    "scale_dtype": scale_dtype}
        manifest["storage"] = storage_report(model, {f: grid for f in achieved},
                                             {f: 1 - achieved[f]["sparsity"] for f in achieved})
    return Result(manifest, {"nm_permutations.safetensors": perms} if perms else {})


def _by_grid(grids: dict[str, QuantGrid], group: dict) -> dict[QuantGrid, list[str]]:
    """The FQNs of ``group`` by their grid (mixed precision can give q, k and v different bit-widths)."""
    by_grid: dict[QuantGrid, list[str]] = {}
    for fqn in group:
        by_grid.setdefault(grids[fqn], []).append(fqn)
    return by_grid


def quantize(model, tokenizer=None, method: str = "gptq", wbits: int = 4, group_size: int | None = 128,
             symmetric: bool = True, scale_dtype: str | None = None, act_order: bool = False,
             abits: int | None = None, act_clip: float | None = None, rotate: str | None = None,
             transform: str | None = None, alpha: float | None = None, weight_clip: float | None = None,
             act_symmetric: bool | None = None, kvbits: int | None = None, kv_clip: float = 1.0,
             intact_kv: str | None = None, intact_prefix: str | None = None, calibrate_kv: bool = False,
             lwc: bool = False,
             epochs: int | None = None,
             avg_bits: float | None = None, allocation: str = "uniform", allocation_options: dict | None = None,
             overrides: dict[str, int] | None = None, calib: torch.Tensor | None = None,
             calib_source: str = "wikitext2", nsamples: int = 128,
             seqlen: int = 2048, sampling: str = "random", seed: int = 0, data_dir: str | None = None,
             device: str = "cpu", batch_size: int | None = None, blocksize: int = 128, damp: float = 0.01,
             progress: bool = True, io: BlockIO | None = None, checkpoint: Checkpoint | None = None,
             sequential: bool = True) -> Result:
    """Quantize the weights of every decoder-block linear in place (simulated: weights stay float on
    the grid), optionally after a QuaRot rotation and with simulated per-token activation quantization.

    ``method``: a name in ``quant.methods.QUANTIZERS`` ('rtn', data-free, or 'gptq'). ``avg_bits`` with an
    ``allocation`` gives per-layer bit-widths (integers from 2..8) whose parameter-weighted mean stays at or under
    ``avg_bits``; ``overrides`` (regex -> bits, ``core.budgets.apply_overrides``) then set the layers they match.
    ``scale_dtype='float16'``
    rounds scales to float16 so that GGUF export is exact (see quant.grids.float16_scales). ``io`` and
    ``checkpoint`` stream blocks from and to disk and make the run resumable, as in ``prune``.
    ``sequential=False`` calibrates every block on the dense model's activations in one pass
    (``core.engine.compress_blocks``).

    Weight-activation quantization: ``abits`` (per token), ``kvbits`` (KV cache per head and token), ``transform``
    (``smoothquant``, ``duquant`` [``lwc``], ``flatquant``: ``transforms.outliers``; ``alpha``, ``epochs``), ``weight_clip``,
    ``act_clip``, ``act_symmetric``, ``kv_clip`` (None: the transform's defaults, ``hooks.runtime.DEFAULTS``),
    ``intact_kv`` ('bos' or 'prefix' with ``intact_prefix``: ``hooks.intactkv``; ``calibrate_kv`` tunes its cache on
    the calibration windows, IntactKV+Cal). The result's tensors hold what
    a reloaded model needs to compute the same thing (``apply_runtime``).
    """
    quantizer = get_quantizer(method)
    if rotate not in (None, "none", "hadamard"):
        raise SlimlmError(f"unknown rotation '{rotate}'; choose none or hadamard")
    runtime = Runtime(transform, alpha, weight_clip, abits, act_clip, act_symmetric, kvbits, kv_clip,
                      kvbits is not None and (rotate == "hadamard" or transform == "duquant"), intact_kv,
                      intact_prefix, lwc).resolved()
    runtime.check(model, rotate == "hadamard", io is not None, checkpoint is not None)
    if calibrate_kv and not intact_kv:
        raise SlimlmError("calibrate_kv tunes IntactKV's cache: it needs intact_kv")
    if epochs is not None and transform != "flatquant" and not lwc:
        raise SlimlmError("epochs counts the block training of transform='flatquant' or lwc=True")
    pivot_ids = intactkv.pivot_tokens(tokenizer, intact_kv, intact_prefix) if intact_kv else None
    QuantGrid(wbits, symmetric, group_size, runtime.weight_clip, scale_dtype)  # validates before any work
    if avg_bits is not None and allocation not in ALLOCATORS:  # before the rotation changes the model
        raise unknown("allocation", allocation, ALLOCATORS)
    apply_overrides(dict.fromkeys(linear_fqns(model)), overrides)  # a regex that matches no layer fails here
    for bits in (overrides or {}).values():
        QuantGrid(bits, symmetric, group_size, scale_dtype=scale_dtype)
    if io is not None and avg_bits is not None and allocation != "uniform":
        raise SlimlmError("--offload disk quantizes weights block by block only: no --avg-bits with a non-uniform "
                          "allocation")
    torch.manual_seed(seed)
    start, timings, calib_info = time.perf_counter(), {}, None
    rotation = rotate_(model, seed=seed, progress=progress) if rotate == "hadamard" else None
    pivots = intactkv.pivot_cache(model, pivot_ids) if pivot_ids else None  # full precision, before rounding
    layers = linear_fqns(model)
    if quantizer.needs_data or transform or calibrate_kv or (
            avg_bits is not None and ALLOCATOR_METRIC.get(allocation) in ("owl_lod", "fisher")):
        calib, calib_info = calibration_for(model, tokenizer, calib, calib_source, nsamples, seqlen, sampling,
                                            seed, data_dir)
    reference = intactkv.reference_outputs(model, calib, pivots) if calibrate_kv else None
    bits = {fqn: wbits for fqn in layers}
    if avg_bits is not None:
        metrics = allocation_metrics(model, allocation, calib, device, batch_size, progress,
                                     grid=QuantGrid(wbits, symmetric, group_size, scale_dtype=scale_dtype))
        continuous = allocate_from_metrics(metrics, allocation, avg_bits, "bits", **(allocation_options or {}))
        bits = round_bits(continuous, {f: layers[f].weight.numel() for f in layers})
    bits = apply_overrides(bits, overrides)
    grids = {fqn: QuantGrid(b, symmetric, group_size, runtime.weight_clip, scale_dtype) for fqn, b in bits.items()}
    losses = checkpoint.records if checkpoint is not None else {}  # saved with each block, refilled on resume

    options = GPTQOptions(blocksize, damp, act_order)

    def compress(group, stats):
        for grid, fqns in _by_grid(grids, group).items():
            weights = [group[fqn].weight.data for fqn in fqns]
            for fqn, W, Q, loss in zip(fqns, weights, *quantizer.fn(weights, stats, grid, options)):
                W.copy_(Q)
                if loss is not None:
                    losses[fqn] = loss
        return True

    sites, learned, prepare = {}, {}, None
    if transform:
        compress, prepare = transform_callbacks(model, runtime, QuantGrid(wbits, symmetric, group_size), compress,
                                                sites, learned, seed, epochs)
    if quantizer.needs_data or transform:
        timings |= compress_blocks(model, calib, compress, set(layers), hessian=quantizer.needs_data,
                                   device=device, batch_size=batch_size, progress=progress, io=io,
                                   checkpoint=checkpoint, sequential=sequential and prepare is None,
                                   window_mean=transform == "duquant", prepare=prepare, results=(losses,))
    else:
        timings |= compress_data_free(model, compress, set(layers), io, checkpoint, progress, (losses,))
    entries, tensors = runtime_record(runtime, seed, sites, pivots, pivot_ids, learned)
    attach_runtime_(model, {"abits": abits, "act_clip": runtime.act_clip, **entries}, tensors)
    if reference is not None:  # the quantized model's pivot cache, tuned to its layer outputs
        tensors |= intactkv.to_tensors(intactkv.calibrate_(model, reference, calib, intactkv.from_tensors(tensors),
                                                           progress=progress))
        entries["intact_kv"]["calibrated"] = True
    timings["total"] = time.perf_counter() - start
    manifest = {
        "kind": "quantize", "method": method, "wbits": wbits, "group_size": group_size, "symmetric": symmetric,
        "scale_dtype": scale_dtype,
        "act_order": act_order, "abits": abits, "act_clip": runtime.act_clip, "rotation": rotation, **entries,
        # achieved parameter-weighted mean bit-width (mixed precision stays at or under avg_bits)
        "bits": sum(bits[f] * layers[f].weight.numel() for f in layers)
        / sum(lin.weight.numel() for lin in layers.values()),
        "allocation": {"name": allocation, "avg_bits": avg_bits, **(allocation_options or {}),
                       **({"overrides": overrides} if overrides else {})},
        "options": {"blocksize": blocksize, "damp": damp, "sequential": sequential}, "calibration": calib_info,
        "device": placement.describe(device),
        "seed": seed, **distributed.record(), "timings": timings, "versions": versions(),
        "layers": {f: {"bits": bits[f], **({"gptq_loss": losses[f]} if f in losses else {})} for f in layers},
        "storage": storage_report(model, grids),
    }
    return Result(manifest, {RUNTIME_FILE: tensors} if tensors else {})


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
