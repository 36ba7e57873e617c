"""Weight spectra (HT-SR): the ESD of every linear, its heavy-tail exponent alpha and WeightWatcher's metrics.

Pure tensor functions, plus ``model_weight_metrics`` over a model's block linears. Weights are ``W`` (out, in).
The ESD (empirical spectral density) of ``W`` is the set of eigenvalues λ of the correlation matrix WᵀW, i.e. the
squared singular values; only the min(out, in) of them that can be non-zero are returned, in ascending order, in
float64.

References:
- Martin & Mahoney, "Implicit Self-Regularization in Deep Neural Networks", JMLR 22 (2021), and the WeightWatcher
  README (alpha, alpha_weighted = α·log10 λ_max, log_norm, stable_rank, entropy).
- Clauset, Shalizi & Newman, "Power-law distributions in empirical data", SIAM Review 51 (2009): continuous MLE
  α = 1 + n / Σ ln(x_i/x_min) (Eq. 3.1, standard error (α−1)/√n, Eq. 3.2) and x_min by minimum KS distance (§3.3).
- Lu et al., "AlphaPruning: Using Heavy-Tailed Self Regularization Theory for Improved Layer-wise Pruning of Large
  Language Models", NeurIPS 2024: PL_Alpha_Hill with the "xmin_peak" candidate rule (repo lib/esd_utils.py).
"""

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

from slimlm.core.architectures import block_of, linear_fqns
from slimlm.core.stats import add_lower_gram_
from slimlm.errors import SlimlmError


ESD_DTYPE = torch.float64  # λ = σ² spans many decades; float64 keeps the small end and the log-sums exact
EIG_RTOL = 1e-12  # λ below EIG_RTOL·λ_max is noise, treated as zero (see _fit_eigs)
PEAK_BINS = 100  # AlphaPruning's histogram over log10 λ used to locate the ESD peak
PEAK_FACTOR = 1.5  # AlphaPruning: x_min candidates are the λ ≤ 1.5 × peak
BATCH_ELEMS = 2**25  # at most ~256 MiB of float64 weights per batched Gram + eigvalsh call
KS_ELEMS = 2**22  # at most ~32 MiB per (candidates × eigenvalues) KS block


class PowerLawFit(NamedTuple):
    """A continuous power-law fit p(λ) ∝ λ^-alpha for λ ≥ xmin."""
    alpha: float
    xmin: float
    ks: float  # Kolmogorov-Smirnov distance of the fitted tail (the references' one-sided form, see _ks_distances)
    n_tail: int  # number of eigenvalues ≥ xmin; the MLE's standard error is (alpha − 1)/√n_tail


def esd(W: torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
    """Eigenvalues of WᵀW for W (..., out, in): the squared singular values, ascending, float64, on ``device``
    (default: W's own). A leading batch dimension gives one row of eigenvalues per matrix.

    ``eigvalsh`` of the smaller Gram matrix (WᵀW or WWᵀ, which share their non-zero eigenvalues) formed in
    float64: 1.7x faster than float64 ``svdvals`` on CPU (measured 52 vs 90 ms on a 1536×576 matrix, one thread).
    Forming the Gram squares the condition number, so each eigenvalue carries an absolute error of about
    r·2⁻⁵³·λ_max (r = min(out, in)) instead of svdvals' relative one: far below EIG_RTOL·λ_max, where the fits stop
    looking. Measured on all 211 linears of SmolLM2-135M against svdvals: top-10 eigenvalues within 2e-14
    relative, all λ > 1e-6·λ_max within 2e-11, every alpha within 3e-12. A float32 Gram (2x cheaper to form)
    is not used: it moves λ ≈ 1e-6·λ_max by 2% and λ_min by orders of magnitude, and although ``alpha_mle`` moved
    by 5e-6 at most, the peak rule's histogram spans log10 λ_min..log10 λ_max: ``alpha`` moved by more than 1e-3
    on 43 of the 211 layers (up to 1.24). Rounding can make a zero eigenvalue slightly negative; it is clamped
    to 0.
    """
    W = W.to(device=device, dtype=ESD_DTYPE)
    return torch.linalg.eigvalsh(_lower_gram(W if W.shape[-2] >= W.shape[-1] else W.mT)).clamp_min(0)


def _lower_gram(W: torch.Tensor) -> torch.Tensor:
    """The lower triangle of WᵀW for W (..., m, n), upper part zero: all that ``eigvalsh`` (UPLO='L') reads."""
    return add_lower_gram_(W.new_zeros(*W.shape[:-2], W.shape[-1], W.shape[-1]), W)


def _map_single_threaded(fn: Callable, items: Sequence, desc: str | None = None) -> list:
    """``[fn(x) for x in items]`` on a pool of ``torch.get_num_threads()`` Python threads, each running torch with
    one intra-op thread (the process-wide setting is restored afterwards); ``desc`` names a progress bar over the
    items (none if None).

    Why: one matrix's eigvalsh (LAPACK sytrd, level-2 heavy) and the small KS tensors gain little from intra-op
    threads, and OpenMP's barriers collapse when the cores are shared: with a load average of 9 on 2 cores, 2
    intra-op threads made the 211 ESDs of SmolLM2-135M take 85-200 s instead of 7-9 s. Independent matrices
    split perfectly instead (measured: same total CPU time, 6.1-7.4 s pooled vs 6.4-6.8 s in a loop).
    """
    threads = torch.get_num_threads()

    def bar(results):
        return list(tqdm(results, desc=desc, total=len(items), disable=desc is None))

    torch.set_num_threads(1)  # a single item too: one ESD with 2 threads took 6-13 s instead of 0.09 s (load 5)
    try:
        if threads == 1 or len(items) < 2:
            return bar(map(fn, items))
        with ThreadPoolExecutor(threads) as pool:
            return bar(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)


def batched_esd(weights: Sequence[torch.Tensor], device: str | torch.device | None = None,
                progress: bool = False) -> list[torch.Tensor]:
    """``esd`` of every matrix on ``device`` (default: each matrix's own); ``progress`` shows a bar over the CPU
    ones (a few batched calls elsewhere).

    On CPU one matrix per task of ``_map_single_threaded`` (LAPACK factors a batch one matrix at a time anyway).
    Elsewhere one batched call per distinct shape: W and Wᵀ share their ESD, so matrices are brought to tall
    orientation first (a LLaMA-style block has only three such shapes: q/o, k/v, gate/up/down), and batches are
    split to stay under ``BATCH_ELEMS`` elements.
    """
    out: list[torch.Tensor] = [torch.empty(0)] * len(weights)
    on_cpu, groups = [], {}
    for i, W in enumerate(weights):
        dev = torch.device(device) if device is not None else W.device
        if dev.type == "cpu":
            on_cpu.append(i)
        else:
            groups.setdefault((max(W.shape), min(W.shape), dev), []).append(i)
    on_cpu.sort(key=lambda i: -weights[i].numel())  # largest first, so no big one is left running alone at the end
    spectra = _map_single_threaded(lambda i: esd(weights[i], "cpu"), on_cpu, "spectra" if progress else None)
    for i, eigs in zip(on_cpu, spectra):
        out[i] = eigs
    for (rows, cols, dev), idx in groups.items():
        per_call = max(1, BATCH_ELEMS // (rows * cols))
        for start in range(0, len(idx), per_call):
            chunk = idx[start : start + per_call]
            tall = [weights[i] if weights[i].shape[0] >= weights[i].shape[1] else weights[i].T for i in chunk]
            for i, eigs in zip(chunk, esd(torch.stack([W.to(dev) for W in tall]))):
                out[i] = eigs
    return out


def _fit_eigs(eigs: torch.Tensor) -> torch.Tensor:
    """Sorted float64 eigenvalues above EIG_RTOL·λ_max; the rest are dropped (ln 0 has no fit).

    λ < 1e-12·λ_max means σ < 1e-6·σ_max: below the float32 resolution of the weights themselves. It is also far
    above what the float64 Gram makes of a zero singular value: measured ≤ 4e-16·λ_max on rank-deficient float32
    matrices from 576×192 to 49152×576. WeightWatcher instead drops λ ≤ 1e-5 (absolute, so scale-dependent) and
    AlphaPruning drops nothing; on SmolLM2-135M neither difference changes any alpha (see ``hill_alpha``).
    """
    lam = eigs.to(ESD_DTYPE).flatten().sort().values
    return lam[lam > EIG_RTOL * lam[-1]]


def _peak_count(lam: torch.Tensor) -> int:
    """How many of the ascending λ are ≤ 1.5 × the ESD peak: AlphaPruning's "xmin_peak" candidates
    (lib/esd_utils.py), which are always a prefix λ_0..λ_{K−1}.

    The peak is the left edge of the fullest of 100 equal-width bins over log10 λ. The reference code also has a
    lower bound, but it compares λ with log10(0.95·peak) (a log against a linear value), which is below every
    eigenvalue in practice (on SmolLM2-135M it excludes no winning candidate); we reproduce its effect by having
    no lower bound.
    """
    logs = lam.log10()
    lo, hi = logs[0].item(), logs[-1].item()
    counts = torch.histc(logs, bins=PEAK_BINS, min=lo, max=hi)
    left_edge = lo + (hi - lo) * counts.argmax().item() / PEAK_BINS
    return int((lam <= PEAK_FACTOR * 10**left_edge).sum())


def _ks_distances(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """KS distance of the fit at every candidate x_min = λ_k, k = 0..C−1, as WeightWatcher and AlphaPruning take it.

    x: (N,) ascending ln λ; alpha: (C,) the exponent fitted at each candidate. For the tail λ_k..λ_{N−1}
    (n = N − k points) the fitted CDF is F(λ_i) = 1 − (λ_i/λ_k)^(1−α) and both references take
    D_k = max_{i≥k} |F(λ_i) − (i−k)/n|, the distance to the lower side of each empirical CDF step only (Clauset
    §3.3's supremum also takes (i−k+1)/n − F(λ_i), larger by up to 1/n; on short tails this is what lets the
    references pick a handful of top eigenvalues, "fingers"). With G_ki = exp((α−1)(x_k − x_i)) the gap is
    |(N − i)/n − G_ki|: one exp per (candidate, eigenvalue) pair and a few in-place passes; rows go in blocks of
    KS_ELEMS elements, each over its columns i ≥ its first k only.
    """
    N, C = x.numel(), alpha.numel()
    step = max(1, KS_ELEMS // N)
    out = []
    for k0 in range(0, C, step):
        k = torch.arange(k0, min(C, k0 + step), device=x.device)
        steps = N - torch.arange(k0, N, device=x.device, dtype=x.dtype)  # N − i for the columns i ≥ k0
        G = (x[k, None] - x[None, k0:]).mul_(alpha[k, None] - 1).exp_()
        gap = torch.addr(G, 1 / (N - k).to(x.dtype), steps, beta=-1).abs_()  # |(N − i)/n − G|
        out.append(gap.triu_().amax(dim=1))  # column c is i = k0 + c, so i < k is below the diagonal; |·| ≥ 0
    return torch.cat(out)


def _hill_fits(eigs: torch.Tensor, rules: Sequence[str]) -> list[PowerLawFit]:
    """``hill_alpha`` for several candidate rules, sharing one pass over the candidates (every rule's candidates
    are a prefix λ_0..λ_{K−1}, so the widest prefix serves all). ``esd_metrics`` of the 211 SmolLM2-135M spectra:
    0.7-0.85 s of CPU on one thread (4.6-5.7 s with the earlier separate scan per rule)."""
    lam = _fit_eigs(eigs)
    N = lam.numel()
    if N < 2:
        return [PowerLawFit(math.nan, math.nan, math.nan, N)] * len(rules)
    counts = []
    for rule in rules:
        if rule not in ("peak", "all"):
            raise SlimlmError(f"xmin_candidates must be 'peak' or 'all', got {rule!r}")
        counts.append(min(_peak_count(lam), N - 1) if rule == "peak" else N - 1)
    C = max(counts)
    x = lam.log()
    suffix = x.flip(0).cumsum(0).flip(0)  # suffix[k] = Σ_{i≥k} ln λ_i
    n = (N - torch.arange(C, device=x.device)).to(x.dtype)
    alpha = 1 + n / (suffix[:C] - n * x[:C])
    D = _ks_distances(x, alpha)
    D = D.masked_fill(~(alpha > 1) | ~torch.isfinite(alpha) | ~torch.isfinite(D), math.inf)
    fits = []
    for c in counts:
        best = int(D[:c].argmin())
        if math.isinf(D[best].item()):
            fits.append(PowerLawFit(math.nan, math.nan, math.nan, 0))
        else:
            fits.append(PowerLawFit(alpha[best].item(), lam[best].item(), D[best].item(), N - best))
    return fits


def hill_alpha(eigs: torch.Tensor, xmin_candidates: str = "peak") -> PowerLawFit:
    """Power-law exponent of the ESD tail: continuous MLE with x_min chosen by minimum KS distance.

    For every candidate x_min = λ_k (ascending λ, n = N − k tail points):
        α_k = 1 + n / Σ_{i≥k} ln(λ_i/λ_k)            (Hill estimator = Clauset Eq. 3.1),
    and the k with the smallest KS distance (``_ks_distances``) wins. All candidates are fitted at once from a
    suffix cumulative sum of ln λ, with no loop over k.

    The AlphaPruning metric "PL_Alpha_Hill"/"alpha_peak" and WeightWatcher's default fit (its own ``WWFit``,
    pl_package="ww", no fix_fingers, no xmax) use this same formula and KS distance; they differ only in the
    candidate set, hence one function:
    - ``"peak"`` (AlphaPruning default): λ_k ≤ 1.5 × the histogram peak of log10 λ (see ``_peak_count``). It
      keeps x_min near the bulk, so α describes the whole tail and is not chased into the last few spikes.
    - ``"all"`` (WeightWatcher default): every λ_k except the largest.
    Remaining differences from the references: WeightWatcher drops λ ≤ 1e-5 (absolute) and AlphaPruning drops
    nothing where we drop λ < EIG_RTOL·λ_max; WeightWatcher switches to a bias-corrected small-sample objective
    below 20 eigenvalues (not reproduced); AlphaPruning computes its ESD with float32 svdvals. On the 211 linears
    of SmolLM2-135M, "all" equals WeightWatcher 0.7.7's alpha and xmin layer by layer to 3e-12
    (bench/analysis_time.py), and "peak" equals AlphaPruning's loop run on our float64 ESD to 1e-12; on its own
    float32 ESD that loop differs by a median 2e-6 but by 0.44 and 0.13 on two q_proj layers (6 and 22): there
    float32 moves λ_min by 4e-4 relative, and that alone (put into our float64 ESD) reproduces the change, because
    the histogram's bins span log10 λ_min..log10 λ_max, so the peak bin and the candidate bound move with them.
    Returns alpha = nan when no candidate gives a finite fit (e.g. all eigenvalues equal).
    """
    return _hill_fits(eigs, (xmin_candidates,))[0]


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
    hill, mle = _hill_fits(lam, ("peak", "all"))
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


def weight_metrics_many(named_weights: dict[str, torch.Tensor], device: str | torch.device | None = None,
                        progress: bool = False) -> dict[str, dict[str, float]]:
    """``weight_metrics`` for every named matrix, spectra computed by ``batched_esd`` on ``device`` (default: each
    matrix's own) and fitted there."""
    eigs = batched_esd(list(named_weights.values()), device, progress)
    return dict(zip(named_weights, _map_single_threaded(esd_metrics, eigs)))


def model_weight_metrics(model, device: str | torch.device | None = None, progress: bool = True) -> dict[str, dict]:
    """Spectral metrics of every linear inside the decoder blocks, keyed by FQN, with block/kind/shape; spectra
    on ``device`` (default: where each weight is)."""
    linears = linear_fqns(model)
    metrics = weight_metrics_many({fqn: lin.weight.detach() for fqn, lin in linears.items()}, device, progress)
    for fqn, lin in linears.items():
        block = block_of(fqn)
        metrics[fqn] = {"name": fqn, "block": int(block.rsplit(".", 1)[1]), "kind": fqn[len(block) + 1:],
                        "shape": list(lin.weight.shape), "size": lin.weight.numel(), **metrics[fqn]}
    return metrics
