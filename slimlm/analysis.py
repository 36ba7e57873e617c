"""Per-layer metrics that feed budget allocation: weight spectra (HT-SR) and activation outliers (OWL).

Pure tensor functions; no model loading, hooks or printing. Weights are ``W`` (out, in). The ESD (empirical
spectral density) of ``W`` is the set of eigenvalues λ of the correlation matrix WᵀW, i.e. the squared singular
values; only the min(out, in) of them that can be non-zero are returned, in ascending order, in float64.

References:
- Martin & Mahoney, "Implicit Self-Regularization in Deep Neural Networks", JMLR 22 (2021), and the WeightWatcher
  README (alpha, alpha_weighted = α·log10 λ_max, log_norm, stable_rank, entropy).
- Clauset, Shalizi & Newman, "Power-law distributions in empirical data", SIAM Review 51 (2009): continuous MLE
  α = 1 + n / Σ ln(x_i/x_min) (Eq. 3.1, standard error (α−1)/√n, Eq. 3.2) and x_min by minimum KS distance (§3.3).
- Lu et al., "AlphaPruning: Using Heavy-Tailed Self Regularization Theory for Improved Layer-wise Pruning of Large
  Language Models", NeurIPS 2024: PL_Alpha_Hill with the "xmin_peak" candidate rule (repo lib/esd_utils.py).
- Yin et al., "Outlier Weighed Layerwise Sparsity (OWL)", ICML 2024: layer-wise outlier distribution (LOD).
- Sun et al., "A Simple and Effective Pruning Approach for Large Language Models (Wanda)", ICLR 2024, Eq. 1.
"""

import math
from typing import NamedTuple, Sequence

import torch

from slimlm.errors import SlimlmError

ESD_DTYPE = torch.float64  # λ = σ² spans many decades; float64 keeps the small end and the log-sums exact
EIG_RTOL = 1e-12  # λ < EIG_RTOL·λ_max means σ < 1e-6·σ_max: below float32 weight resolution, treated as zero
PEAK_BINS = 100  # AlphaPruning's histogram over log10 λ used to locate the ESD peak
PEAK_FACTOR = 1.5  # AlphaPruning: x_min candidates are the λ ≤ 1.5 × peak
BATCH_ELEMS = 2**25  # at most ~256 MiB of float64 per batched svdvals call
KS_ELEMS = 2**22  # at most ~32 MiB per (candidates × eigenvalues) KS block
OWL_M = 5.0  # OWL outlier threshold M: the OWL README's 70% recipe uses 5 (its main.py default --Hyper_m is 3)


class PowerLawFit(NamedTuple):
    """A continuous power-law fit p(λ) ∝ λ^-alpha for λ ≥ xmin."""

    alpha: float
    xmin: float
    ks: float  # Kolmogorov-Smirnov distance of the fitted tail
    n_tail: int  # number of eigenvalues ≥ xmin; the MLE's standard error is (alpha − 1)/√n_tail


def esd(W: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of WᵀW for W (..., out, in): the squared singular values, ascending, float64.

    Computed with ``svdvals`` on W (not ``eigvalsh`` on WᵀW, which squares the condition number and loses the
    small eigenvalues), on W's device. A leading batch dimension gives one row of eigenvalues per matrix.
    """
    return torch.linalg.svdvals(W.to(ESD_DTYPE)).square().flip(-1)


def batched_esd(weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``esd`` of every matrix, with one batched ``svdvals`` call per distinct (shape, device).

    W and Wᵀ share their ESD, so matrices are brought to tall orientation first: a LLaMA-style block has only three
    such shapes (q/o, k/v, gate/up/down). Batches are split to stay under ``BATCH_ELEMS`` elements. On CPU, LAPACK
    still factors the batch one matrix at a time (measured: same time as a loop); the gain is one call per shape
    on CUDA.
    """
    groups: dict[tuple, list[int]] = {}
    for i, W in enumerate(weights):
        key = (max(W.shape), min(W.shape), W.device)
        groups.setdefault(key, []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(weights)
    for (rows, cols, _), idx in groups.items():
        per_call = max(1, BATCH_ELEMS // (rows * cols))
        for start in range(0, len(idx), per_call):
            chunk = idx[start : start + per_call]
            tall = [weights[i] if weights[i].shape[0] >= weights[i].shape[1] else weights[i].T for i in chunk]
            for i, eigs in zip(chunk, esd(torch.stack(tall))):
                out[i] = eigs
    return out


def _fit_eigs(eigs: torch.Tensor) -> torch.Tensor:
    """Sorted float64 eigenvalues with the numerically-zero ones (< EIG_RTOL·λ_max) removed: ln 0 has no fit."""
    lam = eigs.to(ESD_DTYPE).flatten().sort().values
    return lam[lam > EIG_RTOL * lam[-1]]


def _peak_candidates(lam: torch.Tensor) -> torch.Tensor:
    """Indices k with λ_k ≤ 1.5 × the ESD peak, as AlphaPruning's "xmin_peak" rule (lib/esd_utils.py).

    The peak is the left edge of the fullest of 100 equal-width bins over log10 λ. The reference code also has a
    lower bound, but it compares λ with log10(0.95·peak) (a log against a linear value), which is below every
    eigenvalue in practice; we reproduce its effect by having no lower bound.
    """
    logs = lam.log10()
    lo, hi = logs[0].item(), logs[-1].item()
    counts = torch.histc(logs, bins=PEAK_BINS, min=lo, max=hi)
    left_edge = lo + (hi - lo) * counts.argmax().item() / PEAK_BINS
    return torch.nonzero(lam <= PEAK_FACTOR * 10**left_edge).flatten()


def _ks_distance(x: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """KS distance between each candidate's empirical tail CDF and its fitted power-law CDF.

    x: (N,) ascending ln λ; k: (C,) tail start indices; alpha: (C,). For the tail λ_k..λ_{N-1} (n = N − k points)
    the fitted CDF is F(λ) = 1 − (λ/λ_k)^(1−α) and the empirical CDF steps from j/n to (j+1)/n at the j-th tail
    point, so D = max_j max(F_j − j/n, (j+1)/n − F_j) (Clauset §3.3). AlphaPruning's code uses only |F_j − j/n|
    (the lower side of each step), which can be smaller by up to 1/n, most on short tails; we keep the exact sup.
    """
    N = x.numel()
    i = torch.arange(N, device=x.device)
    j = (i[None, :] - k[:, None]).to(x.dtype)  # (C, N) position inside the tail, < 0 outside it
    n = (N - k).to(x.dtype)[:, None]
    F = 1 - torch.exp(-(alpha[:, None] - 1) * (x[None, :] - x[k][:, None]))
    gap = torch.maximum(F - j / n, (j + 1) / n - F).masked_fill(j < 0, -math.inf)
    return gap.amax(dim=1)


def hill_alpha(eigs: torch.Tensor, xmin_candidates: str = "peak") -> PowerLawFit:
    """Power-law exponent of the ESD tail: continuous MLE with x_min chosen by minimum KS distance.

    For every candidate x_min = λ_k (ascending λ, n = N − k tail points):
        α_k = 1 + n / Σ_{i≥k} ln(λ_i/λ_k)            (Hill estimator = Clauset Eq. 3.1),
    and the k with the smallest KS distance wins. All candidates are fitted at once from a suffix cumulative sum of
    ln λ, with no loop over k.

    The AlphaPruning metric "PL_Alpha_Hill"/"alpha_peak" and the WeightWatcher/``powerlaw`` fit use this same
    formula; they differ only in the candidate set, hence one function:
    - ``"peak"`` (AlphaPruning default): λ_k ≤ 1.5 × the histogram peak of log10 λ (see ``_peak_candidates``). It
      keeps x_min near the bulk, so α describes the whole tail and is not chased into the last few spikes.
    - ``"all"`` (WeightWatcher default): every λ_k except the largest.
    Returns alpha = nan when no candidate gives a finite fit (e.g. all eigenvalues equal).
    """
    lam = _fit_eigs(eigs)
    if lam.numel() < 2:
        return PowerLawFit(math.nan, math.nan, math.nan, lam.numel())
    x = lam.log()
    N = x.numel()
    if xmin_candidates == "peak":
        k = _peak_candidates(lam).clamp(max=N - 2).unique()
    elif xmin_candidates == "all":
        k = torch.arange(N - 1, device=x.device)
    else:
        raise SlimlmError(f"xmin_candidates must be 'peak' or 'all', got {xmin_candidates!r}")
    suffix = x.flip(0).cumsum(0).flip(0)  # suffix[k] = Σ_{i≥k} ln λ_i
    n = (N - k).to(x.dtype)
    alpha = 1 + n / (suffix[k] - n * x[k])
    step = max(1, KS_ELEMS // N)
    D = torch.cat([_ks_distance(x, kc, ac) for kc, ac in zip(k.split(step), alpha.split(step))])
    D = D.masked_fill(~torch.isfinite(alpha) | ~torch.isfinite(D), math.inf)
    if not torch.isfinite(D).any():
        return PowerLawFit(math.nan, math.nan, math.nan, 0)
    best = D.argmin()
    return PowerLawFit(alpha[best].item(), lam[k[best]].item(), D[best].item(), int(N - k[best]))


def spectral_entropy(eigs: torch.Tensor) -> float:
    """WeightWatcher's matrix entropy: p_i = λ_i/Σλ, H = −Σ p_i ln p_i / ln(rank), in [0, 1].

    rank counts the eigenvalues above EIG_RTOL·λ_max (WeightWatcher uses the numerical rank too). A rank-1
    matrix has all its mass on one eigenvalue and gets 0.
    """
    lam = _fit_eigs(eigs)
    if lam.numel() < 2:
        return 0.0
    p = lam / lam.sum()
    return (-(p * p.log()).sum() / math.log(lam.numel())).item()


def esd_metrics(eigs: torch.Tensor) -> dict[str, float]:
    """WeightWatcher-style metrics from one ESD (see ``weight_metrics`` for the keys)."""
    lam = eigs.to(ESD_DTYPE).flatten().sort().values
    lam_max, total = lam[-1].item(), lam.sum().item()
    if lam_max <= 0:
        raise SlimlmError("an all-zero weight matrix has no spectrum; leave fully pruned layers out of the analysis")
    hill, mle = hill_alpha(lam, "peak"), hill_alpha(lam, "all")
    return {
        "alpha": hill.alpha,
        "alpha_hat": hill.alpha * math.log10(lam_max),
        "xmin": hill.xmin,
        "n_tail": hill.n_tail,
        "alpha_mle": mle.alpha,
        "xmin_mle": mle.xmin,
        "stable_rank": total / lam_max,
        "spectral_norm": math.sqrt(lam_max),
        "frobenius_norm": math.sqrt(total),
        "log_norm": math.log10(total),
        "log_spectral_norm": math.log10(lam_max),
        "entropy": spectral_entropy(lam),
        "num_eigs": lam.numel(),
    }


def weight_metrics(W: torch.Tensor) -> dict[str, float]:
    """Spectral metrics of one weight matrix W (out, in), as plain Python numbers.

    Keys:
    - alpha, xmin, n_tail: ``hill_alpha(..., "peak")`` (AlphaPruning's metric; smaller = heavier tail).
    - alpha_hat: alpha·log10 λ_max (WeightWatcher's alpha_weighted, AlphaPruning's "alphahat").
    - alpha_mle, xmin_mle: ``hill_alpha(..., "all")`` (WeightWatcher's candidate set).
    - stable_rank: ‖W‖_F²/‖W‖₂² = Σλ/λ_max.
    - spectral_norm, frobenius_norm: ‖W‖₂ = √λ_max and ‖W‖_F = √Σλ (the norms themselves, as torch.linalg gives).
    - log_norm, log_spectral_norm: log10 ‖W‖_F² and log10 ‖W‖₂² (WeightWatcher's definitions use squared norms).
    - entropy: ``spectral_entropy``.  num_eigs: min(out, in).
    """
    return esd_metrics(esd(W))


def weight_metrics_many(named_weights: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """``weight_metrics`` for every named matrix, sharing batched SVDs (``batched_esd``)."""
    eigs = batched_esd(list(named_weights.values()))
    return {name: esd_metrics(e) for name, e in zip(named_weights, eigs)}


def wanda_scores(W: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """Wanda importance S_ij = |W_ij|·‖X_j‖₂ (Wanda Eq. 1), in float32.

    W: (out, in); sqnorm: (in,) per-input-channel squared L2 norm of the calibration inputs (any consistent
    normalisation: the Wanda reference uses the mean over tokens; OWL's ratio is invariant to the scale).
    """
    return W.float().abs() * sqnorm.float().sqrt()[None, :]


def owl_outlier_ratio(scores: torch.Tensor | Sequence[torch.Tensor], m: float = OWL_M) -> float:
    """OWL's layer-wise outlier distribution: the fraction of scores strictly above m × their mean.

    ``scores`` is one tensor of Wanda scores or a sequence of them (OWL concatenates all linears of a block, so the
    mean is over all their entries together). Returned as a fraction in [0, 1]; the OWL code reports 100× this,
    which its min-max normalisation cancels. Mean and count are accumulated in float64 / int64 to stay exact on
    the ~10⁸ entries of a 7B block.
    """
    parts = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    total = sum(p.sum(dtype=torch.float64) for p in parts)
    count = sum(p.numel() for p in parts)
    threshold = (m * total / count).item()
    # compare in at least float32: a bf16/fp16 copy of the threshold would move it by up to 0.4%
    above = sum((p.to(torch.promote_types(p.dtype, torch.float32)) > threshold).sum().item() for p in parts)
    return above / count


# ---------------------------------------------------------------- model level (weights, then calibration)

ERROR_LEVELS = tuple(round(0.05 * i, 2) for i in range(20))  # sparsity 0 .. 0.95, the error-table grid


def pruning_error_table(W: torch.Tensor, sqnorm: torch.Tensor, hessian: torch.Tensor,
                        levels: Sequence[float] = ERROR_LEVELS) -> dict[float, float]:
    """Relative output error of this layer alone, Wanda-pruned per row at each sparsity level.

    error(s) = ‖X(W − W_s)ᵀ‖² / ‖XWᵀ‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with H ∝ XᵀX, so the calibration
    inputs need not be kept. Relative (not absolute) error makes layers of different output scale
    comparable. Wanda's mask is the proxy for every method: it is what the data-aware methods start
    from, and it costs one sort per layer.
    """
    Wf, H = W.float(), hessian.float()
    order = torch.sort(wanda_scores(Wf, sqnorm), dim=1, stable=True).indices
    dense = ((Wf @ H) * Wf).sum().clamp_min(torch.finfo(torch.float32).tiny)
    table = {}
    for s in levels:
        k = int(Wf.shape[1] * s)
        dW = torch.zeros_like(Wf).scatter_(1, order[:, :k], Wf.gather(1, order[:, :k]))
        table[float(s)] = (((dW @ H) * dW).sum() / dense).item()
    return table


def model_weight_metrics(model) -> dict[str, dict]:
    """Spectral metrics of every linear inside the decoder blocks, keyed by FQN, with block/kind/shape."""
    from slimlm.allocate import block_of
    from slimlm.models import linear_fqns

    linears = linear_fqns(model)
    metrics = weight_metrics_many({fqn: lin.weight.detach() for fqn, lin in linears.items()})
    for fqn, lin in linears.items():
        block = block_of(fqn)
        metrics[fqn] = {"name": fqn, "block": int(block.rsplit(".", 1)[1]), "kind": fqn[len(block) + 1:],
                        "shape": list(lin.weight.shape), "size": lin.weight.numel(), **metrics[fqn]}
    return metrics


def calibration_metrics(model, windows: torch.Tensor, owl_m: float = OWL_M, error_levels=ERROR_LEVELS,
                        device="cpu", batch_size: int | None = None, progress: bool = True) -> dict[str, dict]:
    """Activation metrics of every block linear from one dense pass of the engine (weights unchanged).

    Per linear: the mean and max input-channel norm ‖X_j‖₂ (per token, i.e. sqrt of the mean square), the
    max/median channel-norm ratio, OWL's outlier ratio of the linear alone (``outlier_ratio``) and of its
    whole block (``owl_lod``, the quantity OWL allocates by), and, when ``error_levels`` is given, the
    relative output error table of ``pruning_error_table``.
    """
    from slimlm.allocate import block_of
    from slimlm.engine import compress_blocks
    from slimlm.models import linear_fqns

    linears = linear_fqns(model)
    records, sqnorms = {}, {}

    def record(fqn, linear, stats):
        rms = (stats.sqnorm / stats.ntokens).sqrt()
        sqnorms[fqn] = stats.sqnorm
        records[fqn] = {"input_norm_mean": rms.mean().item(), "input_norm_max": rms.max().item(),
                        "input_norm_max_over_median": (rms.max() / rms.median().clamp_min(1e-30)).item(),
                        "outlier_ratio": owl_outlier_ratio(wanda_scores(linear.weight, stats.sqnorm), owl_m)}
        if error_levels:
            records[fqn]["errors"] = pruning_error_table(linear.weight, stats.sqnorm, stats.hessian, error_levels)
        return False

    compress_blocks(model, windows, record, set(linears), hessian=bool(error_levels), device=device,
                    batch_size=batch_size, progress=progress)
    blocks: dict[str, list[str]] = {}
    for fqn in linears:
        blocks.setdefault(block_of(fqn), []).append(fqn)
    for names in blocks.values():  # OWL: one ratio over the concatenated scores of the block's linears
        lod = owl_outlier_ratio([wanda_scores(linears[f].weight, sqnorms[f]) for f in names], owl_m)
        for f in names:
            records[f]["owl_lod"] = lod
    return records
