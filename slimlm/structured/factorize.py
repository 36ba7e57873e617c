"""``lowrank``: factor the decoder-block linears into two smaller ones at a global parameter target.

Factors: ``svdllm`` (whitened by each linear's calibration Gram) or ``welore`` (plain SVD of the weights);
see ``structured.lowrank``. Ranks (``allocation``):
  * ``uniform``: every matrix keeps the same fraction of its parameters (SVD-LLM's setting);
  * ``welore``: WeLore's one global threshold on min-max normalised singular values;
  * ``owl``, ``alphapruning``: those allocators' per-linear budgets, as fractions of parameters kept;
  * ``fisher``: slimlm's: ``ranks_for_budget`` on each matrix's truncation loss priced in loss units. The
    output error of keeping rank k is the tail Σ_{i>k} σ_i² of the whitened spectrum (exact, SVD-LLM's identity);
    a unit of output error in layer l costs about c_l = Σ_ij F_ij / Σ_j ‖X_j‖² of loss, the layer's Fisher
    diagonal per unit of input energy (F_ij = E[g_i² x_j²]), so loss_l(k) ≈ ½ c_l · tail_l(k).
Only factorizations that save parameters are made; a matrix whose rank would not stays dense.

A non-uniform allocation is checked against uniform ranks at the same parameters on held-out calibration windows
(``allocate.holdout``) by the run's own factors (the check measures exactly what the run makes, merged); ``fisher``
keeps the better of the plans from uniform to its own, the published rules (WeLore, OWL, AlphaPruning) their own.
"""
from __future__ import annotations

import time

import torch

from slimlm.allocate import holdout
from slimlm.analysis.activations import OWL_M
from slimlm.config import LowrankConfig
from slimlm.config.keywords import configure
from slimlm.core import distributed, placement
from slimlm.core.architectures import linear_fqns
from slimlm.core.calibration import calibration_for
from slimlm.core.result import Result
from slimlm.errors import SlimlmError
from slimlm.runs.save import versions
from slimlm.structured import lowrank as lr
from slimlm.structured.shrink import parameter_counts



def _spectra(linears, hessians) -> dict[str, torch.Tensor]:
    """Each linear's singular values: of W S for SVD-LLM (with Grams), else of W."""
    return {f: lr.whitened_singular_values(lin.weight.data, hessians[f]) if hessians else
            lr.singular_values(lin.weight.data) for f, lin in linears.items()}


def _fisher_losses(model, calib, spectra, whitened: bool, progress) -> dict[str, torch.Tensor]:
    """Per linear, the estimated loss increase of keeping each rank (see the module docstring): ½ c_l times the
    output error, which the whitened tail gives exactly and, for plain σ, the weight error times the mean input
    energy per channel approximates (inputs taken as isotropic)."""
    from slimlm.analysis.sensitivity import FISHER_WINDOWS, fisher_diagonal

    fisher, sqnorms = fisher_diagonal(model, calib[:FISHER_WINDOWS], progress)
    losses = {}
    for f, sigma in spectra.items():
        energy = sqnorms[f].sum().clamp_min(1e-30)
        scale = float(fisher[f].sum() / (fisher[f].shape[0] * energy))
        if not whitened:
            scale *= float(energy / sqnorms[f].numel())
        losses[f] = 0.5 * scale * lr.truncation_losses(sigma)
    return losses


def _allocated_ranks(model, allocation, keep, shapes, calib, owl_m, device, batch_size, progress):
    """owl / alphapruning: per-linear fractions of parameters kept -> ranks."""
    from slimlm.allocate import allocate_from_metrics, allocation_metrics

    metrics = allocation_metrics(model, allocation, calib, device, batch_size, progress, owl_m)
    kept = allocate_from_metrics(metrics, allocation, keep, "rank")
    return {f: r if r >= 1 and lr.saves_parameters(out, in_, r) else None
            for f, (out, in_) in shapes.items() for r in [int(kept[f] * out * in_ / (out + in_))]}


def choose_ranks(model, allocation: str, keep: float, spectra: dict, whitened: bool, calib, owl_m=OWL_M,
                 device="cpu", batch_size=None, progress=True) -> dict[str, int | None]:
    """FQN -> rank (None: dense) for every decoder-block linear; ``spectra`` are the factoring method's."""
    linears = linear_fqns(model)
    shapes = {f: tuple(lin.weight.shape) for f, lin in linears.items()}
    if allocation == "uniform":
        return lr.uniform_ranks(shapes, keep)
    if allocation == "welore":  # WeLore's rule reads the weights' own spectra
        plain = {f: lr.singular_values(lin.weight.data) for f, lin in linears.items()} if whitened else spectra
        return lr.welore_ranks(plain, shapes, lr.welore_threshold(plain, shapes, keep))
    if allocation == "fisher":
        return lr.ranks_for_budget(_fisher_losses(model, calib, spectra, whitened, progress), shapes, keep)
    return _allocated_ranks(model, allocation, keep, shapes, calib, owl_m, device, batch_size, progress)


def rank_path(baseline: dict, plan: dict, shapes: dict, points=holdout.PATH) -> dict[str, dict]:
    """Ranks on the way from ``baseline`` to ``plan`` (label -> ranks, as ``holdout.interpolated``): each matrix's
    parameters interpolated linearly, so every point keeps the total, then the largest rank they hold (dense where
    they reach the dense matrix's). The plan itself is the point 1."""
    def params(f, rank):
        return shapes[f][0] * shapes[f][1] if rank is None else rank * sum(shapes[f])

    def rank_within(f, p):
        out, in_ = shapes[f]
        return None if p >= out * in_ else max(1, min(lr.max_useful_rank(out, in_), int(p // (out + in_))))

    path = holdout.interpolated({f: params(f, baseline[f]) for f in plan}, {f: params(f, r) for f, r in plan.items()},
                                points)
    return {label: plan if label == "plan" else {f: rank_within(f, p) for f, p in ps.items()}
            for label, ps in path.items()}


def truncated(W: torch.Tensor, rank: int, H: torch.Tensor | None = None) -> torch.Tensor:
    """The product of ``W``'s rank-``rank`` factors (SVD-LLM's with the Gram ``H``, else the plain SVD's): the
    weight the factorized linear applies, in W's dtype."""
    first, second = lr.factors(lr.decomposition(W, H), rank, W.dtype)
    return second @ first


def check_ranks(model, ranks: dict, keep: float, hessians: dict | None, reference: holdout.Reference,
                allocation: str, progress: bool = True) -> tuple[dict, dict]:
    """(ranks to run, the check's record): ``ranks`` measured against ``uniform_ranks`` and, for ``fisher``, the
    points between (``rank_path``), each matrix replaced by its factors' product (the run's own truncation)."""
    shapes = {f: tuple(lin.weight.shape) for f, lin in linear_fqns(model).items() if f in ranks}
    select = allocation in holdout.SELECTING

    def stand_in(fqn, W, rank):
        return W if rank is None else truncated(W, rank, hessians[fqn] if hessians else None)
    uniform = lr.uniform_ranks(shapes, keep)
    path = rank_path(uniform, ranks, shapes, holdout.PATH if select else (1.0,))
    return holdout.choose(model, reference, uniform, path, stand_in, select, progress)


def lowrank(model, tokenizer=None, config: LowrankConfig | None = None, *, calib: torch.Tensor | None = None,
            data_dir: str | None = None, device: str = "cpu", progress: bool = True, **settings) -> Result:
    """Factor every decoder-block linear of ``model`` in place so that about ``params`` of their parameters stay,
    as ``config`` (a ``LowrankConfig``, or its fields as keywords) says (see the module docstring for ``method``
    and ``allocation``). ``merge``: multiply the factors back into dense weights (the truncation stays, the savings
    go: for engines that cannot hold factors)."""
    c = configure(LowrankConfig, config, settings)
    allocation = c.resolved_allocation
    torch.manual_seed(c.seed)
    start, before, calib_info, reference, check = time.perf_counter(), parameter_counts(model), None, None, None
    if c.uses_data():
        calib, calib_info = calibration_for(model, tokenizer, calib, c, data_dir)
        calib, reference = holdout.hold_out(model, calib, calib_info, c.holdout if allocation != "uniform" else 0)
    hessians = lr.collect_hessians(model, calib, device, progress, c.batch_size) if c.method == "svdllm" else None
    spectra = _spectra(linear_fqns(model), hessians)
    ranks = choose_ranks(model, allocation, c.params, spectra, hessians is not None, calib, c.owl_m, device,
                         c.batch_size, progress)
    if reference is not None:
        ranks, check = check_ranks(model, ranks, c.params, hessians, reference, allocation, progress)
    lr.factorize_(model, ranks, "svdllm" if c.method == "svdllm" else "svd", hessians)
    if c.merge:
        _merge_(model, ranks)
    after = parameter_counts(model)
    return Result({"kind": "lowrank", "method": c.method, "allocation": allocation, "merged": c.merge,
                   "ranks": ranks, "allocation_check": check, "params_before": before, "params": after,
                   "params_kept": after["decoder_linears"] / before["decoder_linears"], "config": c.in_effect(),
                   "calibration": calib_info, "device": placement.describe(device), "seed": c.seed,
                   **distributed.record(), "timings": {"total": time.perf_counter() - start}, "versions": versions()})


def _merge_(model, ranks) -> None:
    for fqn, rank in ranks.items():
        if rank is not None:
            parent, _, name = fqn.rpartition(".")
            setattr(model.get_submodule(parent), name, model.get_submodule(fqn).dense())
    if not all(isinstance(m, torch.nn.Linear) for m in linear_fqns(model).values()):
        raise SlimlmError("merging the factors left a factorized linear behind")
