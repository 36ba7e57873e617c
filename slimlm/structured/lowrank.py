"""Low rank: replace a linear's (out, in) weight by two factors, (out, k)·(k, in), k·(in + out) parameters.

Factors:
  * ``svdllm``: SVD-LLM (Wang et al. 2024, arXiv 2403.07378, §3.1 "truncation-aware data whitening"). With the
    input Gram H = Σ_t x_t x_tᵀ = S Sᵀ (Cholesky) and W S = U Σ Vᵀ, the rank-k weight U_k Σ_k V_kᵀ S⁻¹ has output
    error ‖(W − W′)X‖_F² = Σ_{i>k} σ_i²: each dropped singular value of W S costs exactly its square in output
    space, so truncating the smallest is optimal (plain SVD's σ of W say nothing about the output).
  * ``welore`` / ``svd``: plain SVD of W (WeLore, Jaiswal et al. 2024, arXiv 2407.11239, is data-agnostic).
Ranks:
  * ``welore_threshold`` / ``welore_ranks``: WeLore's one global threshold on min-max normalised singular values;
    a matrix whose kept rank would not save parameters stays dense (WeLore's non-low-rank components, N-LRC).
  * ``ranks_for_budget``: a global allocation minimising the summed truncation loss under a parameter budget.
  * ``uniform_ranks``: every matrix keeps the same fraction of its parameters (SVD-LLM's setting).
A rank of ``None`` everywhere here means "kept dense".
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from slimlm.core.architectures import linear_fqns
from slimlm.core.engine import compress_blocks
from slimlm.errors import SlimlmError, unknown

log = logging.getLogger(__name__)

METHODS = ("svdllm", "welore", "svd")
FACTOR_DTYPE = torch.float64  # every factorization runs in float64; factors are returned in the weight's dtype
DAMP_START = 1e-8  # first damping of a Hessian whose Cholesky fails, as a multiple of mean(diag H); doubled after
DAMP_MAX = 1.0  # past mean(diag H) the damped "Hessian" is mostly the identity: give up instead
MIN_PIVOT = 1e-10  # a Cholesky pivot² below this × mean(diag H) counts as failed: S⁻¹ would amplify by > 1e5


class LowRankLinear(nn.Sequential):
    """``second(first(x))`` in place of an ``nn.Linear(in, out)``: ``first`` (in → rank, no bias), ``second``
    (rank → out, the original's bias). An ``nn.Sequential`` of the two (state-dict keys ``0.weight``, ``1.weight``,
    ``1.bias``), so a saved run is rebuilt from the shapes in its manifest with plain torch modules
    (``core.structure.rebuild_``). Built with uninitialised factors; ``from_factors`` builds one from given factor
    weights. ``weight`` is the merged (out, in) product, for code that reads a linear's ``.weight``; ``dense()``
    merges back into an ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__(nn.utils.skip_init(nn.Linear, in_features, rank, bias=False, device=device, dtype=dtype),
                         nn.utils.skip_init(nn.Linear, rank, out_features, bias=bias, device=device, dtype=dtype))

    @property
    def first(self) -> nn.Linear:
        return self[0]

    @property
    def second(self) -> nn.Linear:
        return self[1]

    @classmethod
    @torch.no_grad()
    def from_factors(cls, first_weight: torch.Tensor, second_weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> LowRankLinear:
        layer = cls(first_weight.shape[1], second_weight.shape[0], first_weight.shape[0], bias is not None,
                    first_weight.device, first_weight.dtype)
        layer.first.weight.copy_(first_weight)
        layer.second.weight.copy_(second_weight)
        if bias is not None:
            layer.second.bias.copy_(bias)
        return layer

    @property
    def in_features(self) -> int:
        return self.first.in_features

    @property
    def out_features(self) -> int:
        return self.second.out_features

    @property
    def rank(self) -> int:
        return self.first.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.second.weight @ self.first.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    @torch.no_grad()
    def dense(self) -> nn.Linear:
        w = self.first.weight
        linear = nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, bias=self.bias is not None,
                                    device=w.device, dtype=w.dtype)
        linear.weight.copy_(self.weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def saves_parameters(out: int, in_: int, rank: int) -> bool:
    """Whether rank-``rank`` factors of an (out, in) matrix are smaller than it: k·(in + out) < in·out, i.e.
    k < in·out / (in + out) (below half the smaller side for a square matrix)."""
    return rank * (in_ + out) < in_ * out


def max_useful_rank(out: int, in_: int) -> int:
    """The largest rank whose factors still save parameters (0: none does, e.g. a single row)."""
    return (in_ * out - 1) // (in_ + out)


def lowrank_params(ranks: dict[str, int | None], shapes: dict[str, tuple[int, int]]) -> int:
    """Parameters of the matrices ``shapes`` (name -> (out, in)) with these ranks (None: dense)."""
    return sum(out * in_ if ranks.get(name) is None else ranks[name] * (out + in_)
               for name, (out, in_) in shapes.items())


# ---- factors ----

def whitening_factor(H: torch.Tensor) -> torch.Tensor:
    """SVD-LLM's whitening matrix: lower-triangular S with H = S Sᵀ (Cholesky), in float64.

    H is any positive multiple of Σ_t x_t x_tᵀ (the factors do not depend on the scale). If the Cholesky fails
    or has a pivot² below MIN_PIVOT × mean(diag H) (a dead input, or fewer calibration tokens than inputs), λ·I is
    added, λ = DAMP_START × mean(diag H), doubled until it succeeds; the truncation loss is then exact for
    H + λI instead of H (SVD-LLM's reference code shifts by the smallest eigenvalue instead; same purpose)."""
    H = H.to(FACTOR_DTYPE)
    scale = H.diagonal().mean()
    if not torch.isfinite(H).all() or not scale > 0:
        raise SlimlmError("the Hessian is zero or not finite; check the calibration inputs for NaN/inf")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp = 0.0
    while damp <= DAMP_MAX:
        S, info = torch.linalg.cholesky_ex(H + damp * scale * eye)
        if info == 0 and S.diagonal().square().min() >= MIN_PIVOT * scale:
            if damp:
                log.warning("Hessian singular; whitened with damping %g x mean(diag H)", damp)
            return S
        damp = 2 * damp if damp else DAMP_START
    raise SlimlmError(f"the Hessian is not positive definite even with damping {DAMP_MAX:g} x mean(diag H)")


def whitened_singular_values(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """σ of W S (float64, descending): SVD-LLM's truncation loss of keeping rank k is Σ_{i>k} σ_i²
    (``truncation_losses``), in the units of H (with the engine's H = (2/n)·Σ x xᵀ, twice the mean squared output
    error per token)."""
    S = whitening_factor(H.to(W.device))
    return torch.linalg.svdvals(W.to(FACTOR_DTYPE) @ S)


def decomposition(W: torch.Tensor, H: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(U, σ, R) with W = U diag(σ) R in float64: R = Vᵀ S⁻¹ from the SVD of W S for SVD-LLM (S the whitening
    factor of the input Gram H), R = Vᵀ for the plain SVD (H None). ``factors`` cuts it at any rank."""
    if H is None:
        return torch.linalg.svd(W.to(FACTOR_DTYPE), full_matrices=False)
    S = whitening_factor(H.to(W.device))
    U, sigma, Vh = torch.linalg.svd(W.to(FACTOR_DTYPE) @ S, full_matrices=False)
    return U, sigma, torch.linalg.solve_triangular(S, Vh, upper=False, left=False)


def factors(parts: tuple[torch.Tensor, ...], rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) = (√Σ_k R_k, U_k √Σ_k) of a ``decomposition``: the √Σ_k split between the factors as in
    SVD-LLM (W′_u = U_k √Σ_k, W′_v = √Σ_k V_kᵀ S⁻¹), which keeps both factors' scales alike for low-precision
    dtypes."""
    U, sigma, R = parts
    root = sigma[:rank].sqrt()
    return (R[:rank] * root[:, None]).to(dtype), (U[:, :rank] * root).to(dtype)


def svdllm_factors(W: torch.Tensor, H: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM's rank-k factors of W (out, in) for input Gram H (in, in): (first, second) with
    second·first = U_k Σ_k V_kᵀ S⁻¹."""
    return factors(decomposition(W, H), rank, W.dtype)


def svd_factors(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain truncated SVD (Eckart-Young, WeLore's factors): first = √Σ_k V_kᵀ, second = U_k √Σ_k."""
    return factors(decomposition(W), rank, W.dtype)


def singular_values(W: torch.Tensor) -> torch.Tensor:
    """σ of W (float64, descending): WeLore's input, and the plain-SVD truncation losses."""
    return torch.linalg.svdvals(W.to(FACTOR_DTYPE))


def truncation_losses(sigma: torch.Tensor) -> torch.Tensor:
    """loss[k] = Σ_{i>k} σ_i² for k = 0..r (r = len(σ), loss[r] = 0): the squared error of keeping rank k,
    in output space for SVD-LLM's whitened σ, in weight space for plain σ. ``ranks_for_budget``'s input."""
    squares = sigma.to(FACTOR_DTYPE).square()
    return torch.cat([squares.flip(0).cumsum(0).flip(0), squares.new_zeros(1)])


# ---- ranks ----

def normalized_spectrum(sigma: torch.Tensor) -> torch.Tensor:
    """WeLore's min-max normalised singular values σ̂ = (σ − σ_min)/(σ_max − σ_min) in float64 (all ones for a
    flat spectrum, which has nothing to drop)."""
    sigma = sigma.to(FACTOR_DTYPE)
    low, high = sigma.min(), sigma.max()
    return torch.ones_like(sigma) if high == low else (sigma - low) / (high - low)


def welore_ranks(singular_values: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                 tau: float) -> dict[str, int | None]:
    """WeLore's ranks for threshold τ: each matrix keeps the singular values with σ̂ ≥ τ (at least one); one whose
    kept rank does not save parameters stays dense (None, an N-LRC)."""
    ranks = {}
    for name, sigma in singular_values.items():
        rank = max(1, int((normalized_spectrum(sigma) >= tau).sum()))
        ranks[name] = rank if saves_parameters(*shapes[name], rank) else None
    return ranks


def _check_target(params_target: float) -> None:
    if not 0 < params_target:
        raise SlimlmError(f"the parameter target must be a positive fraction of the original, got {params_target}")


def welore_threshold(singular_values: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                     params_target: float) -> float:
    """The smallest τ whose ``welore_ranks`` keep at most ``params_target`` × the matrices' original parameters:
    the largest model under the target. WeLore tabulates τ per model; this finds it by bisection over the
    candidate values (the σ̂ themselves: the parameter count only changes there, and only grows as τ falls)."""
    _check_target(params_target)
    budget = params_target * sum(out * in_ for out, in_ in shapes.values())
    candidates = torch.unique(torch.cat([normalized_spectrum(s) for s in singular_values.values()]))

    def fits(i: int) -> bool:
        return lowrank_params(welore_ranks(singular_values, shapes, float(candidates[i])), shapes) <= budget

    low, high = 0, len(candidates) - 1
    if not fits(high):
        least = lowrank_params(welore_ranks(singular_values, shapes, 1.0), shapes)
        raise SlimlmError(f"WeLore cannot reach {params_target:g} of the parameters; its least is "
                          f"{least / sum(o * i for o, i in shapes.values()):.4g}")
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return float(candidates[low])


def uniform_ranks(shapes: dict[str, tuple[int, int]], params_target: float) -> dict[str, int | None]:
    """Every matrix keeps the fraction ``params_target`` of its parameters: k = ⌊target·in·out/(in + out)⌋
    (SVD-LLM's setting); None (dense) where that leaves no rank or saves nothing."""
    _check_target(params_target)
    ranks = {}
    for name, (out, in_) in shapes.items():
        rank = int(params_target * out * in_ / (out + in_))
        ranks[name] = rank if rank >= 1 and saves_parameters(out, in_, rank) else None
    return ranks


def _options(loss: torch.Tensor, out: int, in_: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(params, loss) of each choice for one matrix: index 0 dense (loss 0), index k rank k for every k ≥ 1 that
    saves parameters and that ``loss`` (indexed by kept rank) covers."""
    if loss.dim() != 1 or (loss < 0).any():
        raise SlimlmError("a truncation-loss table must be 1-D and non-negative (see truncation_losses)")
    kmax = min(max_useful_rank(out, in_), len(loss) - 1)
    params = torch.arange(kmax + 1, dtype=FACTOR_DTYPE) * (out + in_)
    params[0] = out * in_
    value = loss[:kmax + 1].to(FACTOR_DTYPE).cpu().clone()
    value[0] = 0.0
    return params, value


def _lagrangian_choice(options, lam: float) -> list[int]:
    """Each matrix's choice minimising loss + λ·params (ties: the first, dense at index 0)."""
    return [int(torch.argmin(value + lam * params)) for params, value in options]


def _spent(options, choice: list[int]) -> float:
    return sum(float(params[j]) for (params, _), j in zip(options, choice))


def _fill(options, choice: list[int], left: float) -> list[int]:
    """Spend what the Lagrangian choice left of the budget: repeatedly take the upgrade (any costlier choice of
    one matrix that fits) with the largest loss decrease per parameter, until none fits."""
    while True:
        best, best_ratio = None, 0.0
        for m, (params, value) in enumerate(options):
            extra, gain = params - params[choice[m]], value[choice[m]] - value
            ratio = torch.where((extra > 0) & (extra <= left) & (gain > 0), gain / extra.clamp_min(1), 0.0)
            j = int(ratio.argmax())
            if ratio[j] > best_ratio:
                best, best_ratio = (m, j), float(ratio[j])
        if best is None:
            return choice
        m, j = best
        left -= float(options[m][0][j] - options[m][0][choice[m]])
        choice[m] = j


BISECTION_STEPS = 64  # halvings of the Lagrange multiplier's bracket: float64 precision


def ranks_for_budget(losses: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                     params_target: float) -> dict[str, int | None]:
    """Ranks minimising Σ loss_m[k_m] subject to total parameters ≤ ``params_target`` × the original.

    ``losses[name][k]``: the loss of keeping rank k (k = 0..r), e.g. ``truncation_losses`` of SVD-LLM's whitened σ
    (its exact output error) or of any per-rank table (a Fisher-weighted one). Only ranks that save parameters are
    offered; otherwise the matrix stays dense (None, loss 0). Lagrangian relaxation: the smallest multiplier λ
    whose per-matrix minimisers of loss + λ·params fit (bisection), then the rest of the budget goes greedily to
    the upgrades with the best loss decrease per parameter (dense is a jump, so the relaxation alone can leave
    budget unused)."""
    _check_target(params_target)
    names = list(losses)
    options = [_options(losses[n], *shapes[n]) for n in names]
    budget = params_target * sum(shapes[n][0] * shapes[n][1] for n in names)
    low, high = 0.0, max(float(value.max()) for _, value in options) + 1.0  # at `high` all take their cheapest
    if _spent(options, _lagrangian_choice(options, high)) > budget:
        least = _spent(options, _lagrangian_choice(options, high)) / (budget / params_target)
        raise SlimlmError(f"cannot factorize to {params_target:g} of the parameters; rank 1 everywhere is {least:.4g}")
    if _spent(options, _lagrangian_choice(options, low)) > budget:
        for _ in range(BISECTION_STEPS):
            mid = (low + high) / 2
            low, high = (low, mid) if _spent(options, _lagrangian_choice(options, mid)) <= budget else (mid, high)
        low = high
    choice = _lagrangian_choice(options, low)
    choice = _fill(options, choice, budget - _spent(options, choice))
    return {n: j or None for n, j in zip(names, choice)}


# ---- models ----

def _linear(linears: dict[str, nn.Linear], fqn: str, rank: int) -> nn.Linear:
    if fqn not in linears:
        raise SlimlmError(f"'{fqn}' is not a linear of this model's decoder blocks (already factorized?)")
    linear = linears[fqn]
    if not 1 <= rank <= min(linear.in_features, linear.out_features):
        raise SlimlmError(f"rank {rank} of {fqn} is outside 1..{min(linear.in_features, linear.out_features)}")
    return linear


def _replace(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


@torch.no_grad()
def factorize_(model: nn.Module, ranks: dict[str, int | None], method: str = "svdllm",
               hessians: dict[str, torch.Tensor] | None = None) -> None:
    """Replace each linear named in ``ranks`` (FQN -> rank; None: left dense) by a ``LowRankLinear``, in place.

    ``method``: 'svdllm' (``svdllm_factors``; needs ``hessians``, FQN -> input Gram, e.g. ``collect_hessians``),
    'welore' or 'svd' (``svd_factors``, data-free). Factors keep the weight's dtype and device."""
    if method not in METHODS:
        raise unknown("low-rank method", method, METHODS)
    linears = linear_fqns(model)
    for fqn, rank in ranks.items():
        if rank is None:
            continue
        linear = _linear(linears, fqn, rank)
        if method == "svdllm":
            if hessians is None or fqn not in hessians:
                raise SlimlmError(f"SVD-LLM needs the calibration Hessian of {fqn}")
            first, second = svdllm_factors(linear.weight, hessians[fqn], rank)
        else:
            first, second = svd_factors(linear.weight, rank)
        _replace(model, fqn, LowRankLinear.from_factors(first, second, linear.bias))


def collect_hessians(model: nn.Module, calib: torch.Tensor, device: str | torch.device = "cpu",
                     progress: bool = True, batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Every decoder-block linear's input Gram H = (2/n)·Σ_t x_t x_tᵀ (``core.stats.LayerStats.hessian``, float32,
    on the CPU), keyed by FQN; linears reading one input (q/k/v, gate/up) share one tensor.

    Measured on the dense model's activations in one pass (the callback changes nothing, so every block's statistics
    pass output feeds the next): SVD-LLM whitens with Grams of the original model's inputs, collected in one
    profiling pass before any truncation (§3.1 and its reference code; the sequential local update is a separate
    step). Memory: one (in, in) float32 matrix per distinct input, about 22 GB for a 7B Llama."""
    hessians: dict[str, torch.Tensor] = {}

    def record(group, stats):
        H = stats.hessian.cpu()
        for fqn in group:
            hessians[fqn] = H
        return False

    compress_blocks(model, calib, record, set(linear_fqns(model)), hessian=True, device=device,
                    batch_size=batch_size, progress=progress, sequential=False, results=(hessians,))
    return hessians
