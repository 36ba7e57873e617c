"""What the allocators read, measured on a model: each allocator's metric (``ALLOCATOR_METRIC``) and nothing
more, then the per-layer sparsity map ``plan_budgets`` that ``prune`` applies."""
from __future__ import annotations

from dataclasses import replace

import torch

from slimlm.allocate.allocators import ALLOCATOR_METRIC, BIT_LEVELS, allocate_from_metrics
from slimlm.analysis.activations import OWL_M, calibration_metrics
from slimlm.analysis.sensitivity import (ERROR_LEVELS, FISHER_WINDOWS, fisher_bit_tables, fisher_diagonal,
                                         fisher_sparsegpt_tables, fisher_tables)
from slimlm.analysis.spectra import model_weight_metrics
from slimlm.core.architectures import linear_fqns
from slimlm.core.timing import timed
from slimlm.errors import SlimlmError
from slimlm.quant.grids import QuantGrid


def allocation_metrics(model, allocation: str, calib=None, device="cpu", batch_size=None, progress=True,
                       owl_m: float = OWL_M, grid: QuantGrid | None = None, method: str | None = None):
    """The metric records an allocator reads, measuring only what it needs (one dense pass at most, or the
    gradient pass of ``fisher``; with a ``grid``, ``fisher`` measures bit-width tables on that grid's kind, with
    ``method='sparsegpt'`` it prices SparseGPT's changes, see ``fisher_metrics``)."""
    metric = ALLOCATOR_METRIC.get(allocation)
    if metric == "alpha" or metric is None:
        return model_weight_metrics(model, device, progress) if metric else {f: {"size": l.weight.numel()}
                                                           for f, l in linear_fqns(model).items()}
    if calib is None:
        raise SlimlmError(f"allocation '{allocation}' needs calibration data")
    if metric == "fisher":
        return fisher_metrics(model, calib, progress=progress, grid=grid, method=method)
    levels = ERROR_LEVELS if metric == "errors" else None
    metrics = calibration_metrics(model, calib, owl_m, levels, device, batch_size, progress)
    for fqn, lin in linear_fqns(model).items():
        metrics[fqn]["size"] = lin.weight.numel()
    return metrics


def plan_budgets(model, allocation: str, target: float, calib: torch.Tensor | None = None,
                 owl_m: float = OWL_M, device: str = "cpu", batch_size: int | None = None,
                 progress: bool = True, method: str | None = None, **options) -> dict[str, float]:
    """Per-layer sparsity from an allocator (``options`` go to it: ``lamda``, ``epsilon``); ``method`` is the
    pruning method the map is for (``fisher`` prices SparseGPT's changes differently from the others')."""
    metrics = allocation_metrics(model, allocation, calib, device, batch_size, progress, owl_m, method=method)
    return allocate_from_metrics(metrics, allocation, target, "sparsity", **options)


def fisher_metrics(model, calib: torch.Tensor, levels=ERROR_LEVELS, progress: bool = True,
                   grid: QuantGrid | None = None, method: str | None = None,
                   timings: dict[str, float] | None = None) -> dict[str, dict]:
    """Per linear: ``size`` and ``fisher``, its estimated loss-increase table per sparsity level, the Fisher from
    the first ``FISHER_WINDOWS`` calibration windows: ``analysis.sensitivity.fisher_tables`` (the weights Wanda would remove),
    or for ``method='sparsegpt'`` ``analysis.sensitivity.fisher_sparsegpt_tables`` (SparseGPT's own changes, Hessians from all
    of ``calib``). With a ``grid``, also ``fisher_bits``, the table per bit-width of ``BIT_LEVELS`` on grids like
    it (``analysis.sensitivity.fisher_bit_tables``). ``timings`` (if given) gets the seconds of the gradient pass
    (``fisher_gradients``) and of the tables (``fisher_tables``)."""
    timings = {} if timings is None else timings
    with timed(timings, "fisher_gradients"):
        fisher, sqnorms = fisher_diagonal(model, calib[:FISHER_WINDOWS], progress)
    with timed(timings, "fisher_tables"):
        if method == "sparsegpt":
            tables = fisher_sparsegpt_tables(model, calib, fisher, levels, progress)
        else:
            tables = fisher_tables(model, fisher, sqnorms, levels, progress)
        records = {f: {"size": lin.weight.numel(), "fisher": tables[f], "fisher_for": method or "wanda"}
                   for f, lin in linear_fqns(model).items()}
        if grid is not None:
            bit_tables = fisher_bit_tables(model, fisher, lambda b: replace(grid, bits=b), BIT_LEVELS, progress)
            for f, record in records.items():
                record["fisher_bits"] = bit_tables[f]
    return records
