"""Orthogonal rotations: Hadamard matrices of many orders, QuaRot's randomized Hadamard, random orthogonal.

References:
- QuaRot: Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024 (arXiv 2404.00456), §3.
- Paley, "On orthogonal matrices", J. Math. Phys. 12 (1933): Hadamard constructions I and II.
"""
import functools
import logging
import math

import torch

from slimlm.errors import SlimlmError

logger = logging.getLogger(__name__)


_H2 = torch.tensor([[1.0, 1], [1, -1]])  # Sylvester's building block


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _paley_prime(n: int) -> tuple[int, int] | None:
    """(q, 1) if n = q + 1 with q ≡ 3 mod 4 prime (Paley I), (q, 2) if n = 2(q + 1) with q ≡ 1 mod 4 prime (II)."""
    if n % 4 == 0 and _is_prime(n - 1):
        return n - 1, 1
    if n % 8 == 4 and _is_prime(n // 2 - 1):
        return n // 2 - 1, 2
    return None


def _paley(n: int) -> torch.Tensor:
    """Unnormalized ±1 Hadamard matrix of order n by Paley's construction over the prime field F_q.

    With χ the Legendre symbol mod q and the Jacobsthal matrix Q_ij = χ(j − i), C = [[0, 1ᵀ], [±1, Q]]:
    I (q ≡ 3 mod 4): Q is antisymmetric, C skew (lower-left −1), C Cᵀ = qI, so H = I + C.
    II (q ≡ 1 mod 4): C symmetric, H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]].
    """
    q, kind = _paley_prime(n)
    chi = -torch.ones(q)
    chi[torch.arange(1, q) ** 2 % q] = 1  # quadratic residues
    chi[0] = 0
    C = torch.zeros(q + 1, q + 1)
    C[0, 1:] = 1
    C[1:, 0] = -1 if kind == 1 else 1
    C[1:, 1:] = torch.stack([chi.roll(r) for r in range(q)])  # row r: χ(j − r), a circulant
    if kind == 1:
        return C + torch.eye(q + 1)
    return torch.kron(C, _H2) + torch.kron(torch.eye(q + 1), torch.tensor([[1.0, -1], [-1, -1]]))


@functools.lru_cache(maxsize=None)
def _hadamard_factors(n: int) -> tuple[int, ...] | None:
    """Orders whose Kronecker product builds a Hadamard matrix of order n: 2 (Sylvester) or Paley orders.

    Powers of two are pure Sylvester (the fast Walsh-Hadamard transform's matrix); otherwise the largest power
    of two is split off that leaves a Paley order (the smallest dense block); failing that, any split into two
    constructible orders.
    """
    if n & (n - 1) == 0:
        return (2,) * (n.bit_length() - 1)
    if n % 4:
        return None  # Hadamard orders above 2 are multiples of 4
    twos = (n & -n).bit_length() - 1
    for k in range(twos, -1, -1):
        if _paley_prime(n >> k):
            return (2,) * k + (n >> k,)
    for d in range(3, math.isqrt(n) + 1):
        if n % d == 0:
            a, b = _hadamard_factors(d), _hadamard_factors(n // d)
            if a is not None and b is not None:
                return a + b
    return None


def has_hadamard(n: int) -> bool:
    """Whether hadamard_matrix(n) can build order n."""
    return _hadamard_factors(n) is not None


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthogonal Hadamard matrix H/√n (H Hᵀ = I) of order n.

    Built as a Kronecker product of 2x2 Sylvester blocks and one Paley block over a prime field (order q+1,
    q ≡ 3 mod 4, or 2(q+1), q ≡ 1 mod 4), e.g. 12, 20, 28, 36; 64 = 2^6 (pure Sylvester, every power of two);
    576 = 16·36 (q = 17); 960 = 16·60; 1536 = 128·12; 11008 = 2·5504 (q = 5503); 13824 = 128·108;
    14336 = 512·28; 18944 = 128·148. Orders that need prime-power fields or other constructions raise
    ValueError: the smallest is 52, then 92, 100, 116, 156, 172, 184, 188, ... (156 of the 512 multiples of 4 up
    to 2048). ``has_hadamard`` tells in advance; ``random_hadamard`` falls back to a random orthogonal matrix.
    """
    factors = _hadamard_factors(n)
    if factors is None:
        raise SlimlmError(f"no Hadamard construction for order {n}; use random_orthogonal({n}, seed) instead")
    blocks = [(_paley(f) if f > 2 else _H2).to(dtype) / math.sqrt(f) for f in factors]  # each block orthogonal
    return functools.reduce(torch.kron, blocks, torch.ones(1, 1, dtype=dtype))


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Haar-random orthogonal matrix: QR of a seeded Gaussian, columns sign-fixed by diag(R) so the
    distribution is uniform (otherwise QR's sign convention biases it). Computed in float64."""
    G = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    return (Q * torch.sign(torch.diag(R))).to(dtype)


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """QuaRot's randomized Hadamard H·diag(s), s ∈ {±1}ⁿ seeded: orthogonal, spreads outliers like H but is a
    different rotation per seed. Orders without a Hadamard construction fall back to random_orthogonal (warned)."""
    if not has_hadamard(n):
        logger.warning("no Hadamard matrix of order %d; using a random orthogonal matrix instead", n)
        return random_orthogonal(n, seed, dtype)
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return hadamard_matrix(n, dtype) * signs.to(dtype)
