"""FlatQuant: learnable affine transforms per layer that flatten weights and activations before quantization.

Reference: Sun et al., "FlatQuant: Flatness Matters for LLM Quantization", ICML 2025, §3, and its code
(ruikangliu/FlatQuant, flatquant/). Each linear's input X becomes X·diag(d)·(P₁ ⊗ P₂) and its weight
W·diag(d)⁻¹·(P₁ ⊗ P₂)⁻ᵀ (the same product), with
  - Kronecker factors of balanced sizes (``kron_dims``: the most balanced n₁·n₂ = n), each P = U·diag(σ)·Vᵀ with
    U, V orthogonal (a fixed random orthogonal start times a Cayley map of a learned skew matrix, so they stay
    orthogonal) and σ learned from 1: P⁻ᵀ = U·diag(1/σ)·Vᵀ exists by construction;
  - a per-channel scale d, initialised SmoothQuant-style with α = 0.3 (d = max|W|^(1−α) / max|X|^α) and folded
    into the norm (q/k/v, gate/up) or into up_proj's rows (down_proj);
  - per-output-channel learnable weight clipping (LWC: σ(γ)·max, σ(β)·min of each row, init γ = β = 4) and a
    learnable clipping ratio per activation quantizer (LAC, init 4), K and V included. One ratio per quantizer,
    applied to both ends of its range, where the paper learns two on asymmetric ones (our grids take one ratio);
  - per head: a value transform merged into v_proj's rows (undone in o_proj), a heads transform on o_proj's input
    (online), and a key transform applied to queries (inverse-transpose) and keys after RoPE (online).
Calibration (flatquant/train_utils.py and the W4A4KV4 scripts, scripts/*/w4a4kv4.sh): block by block, the quantized
block's output is fitted to the full-precision block's output, each block fed the full-precision model's
activations; loss = MSE divided by its own detached value; AdamW (weight decay 0.01) at lr 5e-3 for transforms and
scales and 10× for the clipping parameters, cosine schedule down to lr·1e-3 over all steps; 15 epochs, batch 4.
Rounding passes gradients straight through (to the scales too). Then the transforms are fixed, the scales folded,
LWC baked into the weights (clamped to their learned range) and the weights rounded by RTN or GPTQ on the
transformed Hessian (``outliers.transforming``).
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from slimlm.hooks.kvcache import KV_ATTR, KVQuant
from slimlm.transforms.blockfit import clamp_rows, fake_quant_weight, fit_block_, ste_fake_quant
from slimlm.transforms.hadamard import random_orthogonal
from slimlm.transforms.ops import Op, transform_weight

EPOCHS, LR, BATCH, DIAG_ALPHA, CLIP_INIT = 15, 5e-3, 4, 0.3, 4.0
ATTN, O, MLP, DOWN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj", \
    ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"


def kron_dims(n: int) -> tuple[int, int]:
    """(n₁, n₂), n₁·n₂ = n, n₁ ≤ n₂ as close as possible: the smallest a ≥ ⌈√n⌉ with a² − n = b², (a − b, a + b)."""
    a = math.isqrt(n - 1) + 1 if n > 1 else 1
    while math.isqrt(a * a - n) ** 2 != a * a - n:
        a += 1
    b = math.isqrt(a * a - n)
    return a - b, a + b


class Affine(nn.Module):
    """P = U·diag(σ)·Vᵀ, U = U₀·cayley(S_U), V = V₀·cayley(S_V): invertible for σ ≠ 0, P⁻ᵀ = U·diag(1/σ)·Vᵀ."""

    def __init__(self, n: int, seed: int):
        super().__init__()
        self.register_buffer("u0", random_orthogonal(n, seed))
        self.register_buffer("v0", random_orthogonal(n, seed + 1))
        self.su, self.sv = nn.Parameter(torch.zeros(n, n)), nn.Parameter(torch.zeros(n, n))
        self.sigma = nn.Parameter(torch.ones(n))

    @staticmethod
    def _cayley(S: torch.Tensor) -> torch.Tensor:
        A = S - S.mT
        eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        return torch.linalg.solve(eye - A, eye + A)

    def matrix(self, inverse_transpose: bool = False) -> torch.Tensor:
        U, V = self.u0 @ self._cayley(self.su), self.v0 @ self._cayley(self.sv)
        sigma = 1 / self.sigma if inverse_transpose else self.sigma
        return (U * sigma) @ V.mT


def _kron_apply(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """x (A ⊗ B) over the last dimension."""
    return (A.mT @ x.unflatten(-1, (A.shape[0], B.shape[0])) @ B).flatten(-2)


class KronAffine(nn.Module):
    def __init__(self, n: int, seed: int):
        super().__init__()
        n1, n2 = kron_dims(n)
        self.a, self.b = Affine(n1, seed), Affine(n2, seed + 2)

    def factors(self, inverse_transpose: bool = False):
        return self.a.matrix(inverse_transpose), self.b.matrix(inverse_transpose)


class FlatBlock(nn.Module):
    """The trainable transforms, scales and clipping parameters of one Llama-family block."""

    def __init__(self, block: nn.Module, absmax: dict[str, torch.Tensor], seed: int, alpha: float = DIAG_ALPHA):
        super().__init__()
        from slimlm.transforms.smoothquant import smoothing_scales

        attn, mlp = block.self_attn, block.mlp
        head_dim = attn.head_dim
        self.heads = attn.o_proj.in_features // head_dim
        self.attn, self.mlp = KronAffine(attn.q_proj.in_features, seed), KronAffine(mlp.up_proj.in_features, seed + 4)
        self.down = KronAffine(mlp.down_proj.in_features, seed + 8)
        self.v, self.o, self.k = Affine(head_dim, seed + 12), Affine(self.heads, seed + 14), Affine(head_dim, seed + 16)
        linears = dict(block.named_modules())
        inits = {"attn": ATTN, "mlp": MLP, "down": (DOWN,)}
        self.diag = nn.ParameterDict({site: nn.Parameter(1 / smoothing_scales(
            absmax[names[0]], [linears[n].weight for n in names], alpha)) for site, names in inits.items()})
        self.lwc = nn.ParameterDict({n.replace(".", "_"): nn.Parameter(torch.full((linears[n].out_features, 2),
                                     CLIP_INIT)) for n in (*ATTN, O, *MLP, DOWN)})
        self.lac = nn.ParameterDict({site: nn.Parameter(torch.tensor(CLIP_INIT))
                                     for site in ("attn", "o", "mlp", "down", "k", "v")})

    def clip_parameters(self) -> list[nn.Parameter]:
        return [*self.lwc.values(), *self.lac.values()]

    def ops(self) -> dict[str, list[Op]]:
        """The fixed transform of every linear's input (block-relative names), fused parts first."""
        with torch.no_grad():
            d = self.v.matrix().shape[0]
            attn = [Op("scale", (self.diag["attn"].detach(),), fused=True), Op("kron", self.attn.factors())]
            o = [Op("kron", (torch.eye(self.heads), self.v.matrix()), fused=True),
                 Op("kron", (self.o.matrix(), torch.eye(d)))]
            mlp = [Op("scale", (self.diag["mlp"].detach(),), fused=True), Op("kron", self.mlp.factors())]
            down = [Op("scale", (self.diag["down"].detach(),), fused=True), Op("kron", self.down.factors())]
        return {**dict.fromkeys(ATTN, attn), O: o, **dict.fromkeys(MLP, mlp), DOWN: down}

    def lwc_ratios(self, name: str):
        ratios = torch.sigmoid(self.lwc[name.replace(".", "_")])
        return ratios[:, :1], ratios[:, 1:]

    def lac_ratio(self, site: str) -> torch.Tensor:
        return torch.sigmoid(self.lac[site])

    def matrices(self) -> dict[str, torch.Tensor | tuple]:
        """Every transform as matrices (and inverse-transposes, suffix _it), computed once per training step."""
        return {"attn": self.attn.factors(), "attn_it": self.attn.factors(True), "mlp": self.mlp.factors(),
                "mlp_it": self.mlp.factors(True), "down": self.down.factors(), "down_it": self.down.factors(True),
                "v": self.v.matrix(), "v_it": self.v.matrix(True), "o": self.o.matrix(), "o_it": self.o.matrix(True),
                "k": self.k.matrix(), "k_it": self.k.matrix(True)}


def _weights(block: nn.Module, flat: FlatBlock, m: dict, grid) -> dict[str, torch.Tensor]:
    """The block's parameters as the quantized, transformed block uses them (differentiable in ``flat``)."""
    attn, mlp, diag = block.self_attn, block.mlp, flat.diag
    d = attn.head_dim

    def cols(W, scale, factors):
        return _kron_apply(W / scale, *factors)

    v_rows = (m["v"].mT @ attn.v_proj.weight.unflatten(0, (-1, d))).flatten(0, 1)
    W = {"self_attn.q_proj": cols(attn.q_proj.weight, diag["attn"], m["attn_it"]),
         "self_attn.k_proj": cols(attn.k_proj.weight, diag["attn"], m["attn_it"]),
         "self_attn.v_proj": cols(v_rows, diag["attn"], m["attn_it"]),
         "self_attn.o_proj": _kron_apply(attn.o_proj.weight, m["o_it"], m["v_it"]),
         "mlp.gate_proj": cols(mlp.gate_proj.weight, diag["mlp"], m["mlp_it"]),
         "mlp.up_proj": cols(mlp.up_proj.weight * diag["down"][:, None], diag["mlp"], m["mlp_it"]),
         "mlp.down_proj": cols(mlp.down_proj.weight, diag["down"], m["down_it"])}
    params = {f"{n}.weight": fake_quant_weight(w, grid, *flat.lwc_ratios(n)) for n, w in W.items()}
    params["input_layernorm.weight"] = block.input_layernorm.weight * diag["attn"]
    params["post_attention_layernorm.weight"] = block.post_attention_layernorm.weight * diag["mlp"]
    if attn.v_proj.bias is not None:
        params["self_attn.v_proj.bias"] = (attn.v_proj.bias.unflatten(0, (-1, d)) @ m["v"]).flatten()
    if mlp.up_proj.bias is not None:
        params["mlp.up_proj.bias"] = mlp.up_proj.bias * diag["down"]
    return params


def _training_hooks(block: nn.Module, flat: FlatBlock, m: dict, abits: int | None, act_symmetric: bool,
                    kvbits: int | None) -> list:
    """Online transforms and activation/KV quantizers of the block while it trains (removed afterwards)."""
    attn = block.self_attn
    eye = torch.eye(attn.head_dim)
    online = {"attn": lambda x: _kron_apply(x, *m["attn"]), "o": lambda x: _kron_apply(x, m["o"], eye),
              "mlp": lambda x: _kron_apply(x, *m["mlp"]), "down": lambda x: _kron_apply(x, *m["down"])}

    def hook_for(site):
        def hook(module, args):
            x = online[site](args[0])
            if abits is not None:
                r = flat.lac_ratio(site)
                x = ste_fake_quant(x, abits, act_symmetric, r, r)
            return (x,) + args[1:]
        return hook

    sites = {**dict.fromkeys(ATTN, "attn"), O: "o", **dict.fromkeys(MLP, "mlp"), DOWN: "down"}
    modules = dict(block.named_modules())
    handles = [modules[name].register_forward_pre_hook(hook_for(site)) for name, site in sites.items()]
    if kvbits is not None:
        def kv(query, key, value):
            rk, rv = flat.lac_ratio("k"), flat.lac_ratio("v")
            return (query @ m["k_it"], ste_fake_quant(key @ m["k"], kvbits, False, rk, rk),
                    ste_fake_quant(value, kvbits, False, rv, rv))
        setattr(attn, KV_ATTR, kv)
    return handles


def train_block_(block: nn.Module, flat: FlatBlock, inputs: torch.Tensor, targets: torch.Tensor, call_args: dict,
                 grid, abits: int | None, act_symmetric: bool, kvbits: int | None, epochs: int = EPOCHS,
                 lr: float = LR, batch: int = BATCH) -> tuple[float, float]:
    """Fit ``flat`` so that the quantized block maps ``inputs`` to ``targets`` (the full-precision block's
    outputs) with the paper's optimizer and schedule (``blockfit.fit_block_``); returns the mean loss of the
    first and of the last epoch."""
    m: dict = {}

    def params():
        m.update(flat.matrices())
        return _weights(block, flat, m, grid)

    clip = {id(p) for p in flat.clip_parameters()}
    groups = [{"params": [p for p in flat.parameters() if id(p) not in clip], "lr": lr},
              {"params": flat.clip_parameters(), "lr": 10 * lr}]
    handles = _training_hooks(block, flat, m, abits, act_symmetric, kvbits)
    try:
        return fit_block_(block, params, groups, inputs, targets, call_args, epochs, batch, weight_decay=0.01,
                          normalized=True)
    finally:
        for h in handles:
            h.remove()
        if hasattr(block.self_attn, KV_ATTR):
            delattr(block.self_attn, KV_ATTR)


@torch.no_grad()
def finalize_(block: nn.Module, flat: FlatBlock, kvbits: int | None):
    """Fix the trained transforms into ``block``: fold the scales and the value transform into the producing
    modules, transform every weight, clamp it to its learned clipping range (LWC baked in). Returns the ops of
    every linear (block-relative names), each linear's activation clip ratio, and the block's ``KVQuant``."""
    from slimlm.transforms.ops import set_transform_

    ops = flat.ops()
    attn, mlp = block.self_attn, block.mlp
    d = attn.head_dim
    block.input_layernorm.weight.mul_(flat.diag["attn"])
    block.post_attention_layernorm.weight.mul_(flat.diag["mlp"])
    mlp.up_proj.weight.mul_(flat.diag["down"][:, None])
    V = flat.v.matrix().double()
    attn.v_proj.weight.copy_((V.mT @ attn.v_proj.weight.double().unflatten(0, (-1, d))).flatten(0, 1))
    if mlp.up_proj.bias is not None:
        mlp.up_proj.bias.mul_(flat.diag["down"])
    if attn.v_proj.bias is not None:
        attn.v_proj.bias.copy_((attn.v_proj.bias.double().unflatten(0, (-1, d)) @ V).flatten())
    modules = dict(block.named_modules())
    for name, name_ops in ops.items():
        lin = modules[name]
        W = transform_weight(lin.weight, name_ops)
        lin.weight.copy_(clamp_rows(W, *flat.lwc_ratios(name)))
        set_transform_(lin, name_ops)
    sites = {**dict.fromkeys(ATTN, "attn"), O: "o", **dict.fromkeys(MLP, "mlp"), DOWN: "down"}
    act_clips = {name: flat.lac_ratio(site).item() for name, site in sites.items()}
    kv = None
    if kvbits is not None:
        K = flat.k.matrix()
        kv = KVQuant(kvbits, flat.lac_ratio("k").item(), K, flat.k.matrix(True),
                     value_clip=flat.lac_ratio("v").item())
    return ops, act_clips, kv


def calibrate_block_(block: nn.Module, inputs, targets, call_args, absmax: dict, grid, abits, act_symmetric, kvbits,
                     seed: int = 0, epochs: int = EPOCHS, alpha: float = DIAG_ALPHA) -> dict:
    """Train and fix one block's FlatQuant transforms (``train_block_`` then ``finalize_``); returns the record of
    it: ops and activation clips by block-relative name, the ``KVQuant``, first and last epoch losses, seconds."""
    start = time.perf_counter()
    flat = FlatBlock(block, absmax, seed, alpha)
    first, last = train_block_(block, flat, inputs, targets, call_args, grid, abits, act_symmetric, kvbits, epochs)
    ops, act_clips, kv = finalize_(block, flat, kvbits)
    return {"ops": ops, "act_clips": act_clips, "kv": kv, "values": flat.v.matrix().detach(), "loss": (first, last),
            "seconds": time.perf_counter() - start}
