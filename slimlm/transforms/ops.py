"""Invertible input transforms of a linear layer: x -> x T on the activations, W -> W T⁻ᵀ on the weights.

The outlier-aware quantizers (SmoothQuant, DuQuant, FlatQuant) all rewrite a linear y = x Wᵀ as
y = (x T)(W T⁻ᵀ)ᵀ and quantize x T and W T⁻ᵀ instead of x and W: T moves activation outliers into the
weights (a diagonal scale) or spreads them over many channels (rotations, permutations, affine maps).

A transform is a list of ``Op`` applied left to right, each cheap on its own (T = T₁ T₂ ...):
  ``scale``    x ⊙ v                                   (T = diag(v))
  ``blockrot`` every consecutive block of b channels times the same b×b matrix R   (T = I ⊗ R)
  ``perm``     x[..., idx]                             (a permutation matrix)
  ``kron``     x viewed as (n1, n2) -> Aᵀ X B            (T = A ⊗ B)
An op is ``fused`` when it has been folded into the module that produces x (a norm's scale); the online hook
skips it, while the weights and the Hessian still see it. The remaining ops run online, in a forward pre-hook
of the linear, followed by the simulated activation quantizer (``set_transform_``, ``set_activation_quant_``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimlm.quant.grids import quantize_activations

HOOK_ATTR = "_slimlm_input"  # on each linear with slimlm's input hook: (ops, activation quantizer, handle)
KINDS = ("scale", "blockrot", "perm", "kron")


@dataclass(frozen=True)
class Op:
    kind: str
    tensors: tuple[torch.Tensor, ...]
    fused: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown transform op '{self.kind}'")
        # contiguous, as they are after a save and reload: the same memory layout gives the same float results
        object.__setattr__(self, "tensors", tuple(t.contiguous() for t in self.tensors))


def _apply(x: torch.Tensor, op: Op, inverse_transpose: bool = False) -> torch.Tensor:
    """x T for one op (x T⁻ᵀ with ``inverse_transpose``), over the last dimension, in x's dtype."""
    t = [a.to(x.device, x.dtype) if a.is_floating_point() else a.to(x.device) for a in op.tensors]
    if op.kind == "scale":
        return x / t[0] if inverse_transpose else x * t[0]
    if op.kind == "perm":  # permutations are orthogonal: P⁻ᵀ = P
        return x[..., t[0]]
    if op.kind == "blockrot":  # R orthogonal: R⁻ᵀ = R
        R = t[0]
        return (x.unflatten(-1, (-1, R.shape[0])) @ R).flatten(-2)
    A, B = t
    if inverse_transpose:
        A, B = torch.linalg.inv(A.double()).mT.to(x.dtype), torch.linalg.inv(B.double()).mT.to(x.dtype)
    X = x.unflatten(-1, (A.shape[0], B.shape[0]))
    return (A.mT @ X @ B).flatten(-2)


def apply_ops(x: torch.Tensor, ops: list[Op], online_only: bool = False) -> torch.Tensor:
    for op in ops:
        if not (online_only and op.fused):
            x = _apply(x, op)
    return x


def transform_weight(W: torch.Tensor, ops: list[Op]) -> torch.Tensor:
    """W T⁻ᵀ (rows of W are in the input's space), computed in float64 and returned in W's dtype."""
    out = W.to(torch.float64)
    for op in ops:
        out = _apply(out, op, inverse_transpose=True)
    return out.to(W.dtype)


def transform_hessian(H: torch.Tensor, ops: list[Op]) -> torch.Tensor:
    """Tᵀ H T, the Hessian (2/n) Σ xᵀx of the transformed inputs x T, from the untransformed one (GPTQ after a
    transform needs no second calibration pass). Each op: H <- Tₖᵀ H Tₖ = apply(apply(H)ᵀ), H symmetric."""
    out = H.to(torch.float64)
    for op in ops:
        out = _apply(_apply(out, op).mT.contiguous(), op)
    return out.to(H.dtype)


def _input_hook(ops: list[Op], act: dict | None):
    online = [op for op in ops if not op.fused]

    def hook(module, args):
        x = apply_ops(args[0], online)
        if act is not None:
            x = quantize_activations(x, act["bits"], act["clip"], act["symmetric"]).to(args[0].dtype)
        return (x,) + args[1:]
    return hook


def _rehook_(linear: nn.Linear, ops: list[Op], act: dict | None):
    """One forward pre-hook per linear: the online ops, then the activation quantizer ``act`` ({bits, clip,
    symmetric}). Registered last, so QuaRot's online down_proj rotation (``rotate.attach_online_down_``, always
    prepended) runs before it."""
    if hasattr(linear, HOOK_ATTR):
        getattr(linear, HOOK_ATTR)[2].remove()
    handle = linear.register_forward_pre_hook(_input_hook(ops, act))
    setattr(linear, HOOK_ATTR, (ops, act, handle))
    return handle


def input_ops(linear: nn.Linear) -> list[Op]:
    return getattr(linear, HOOK_ATTR, ([], None, None))[0]


def set_transform_(linear: nn.Linear, ops: list[Op]):
    """Run the online ops of ``ops`` on every input of ``linear`` (its activation quantizer, if any, after)."""
    return _rehook_(linear, ops, getattr(linear, HOOK_ATTR, ([], None, None))[1])


def set_activation_quant_(linear: nn.Linear, bits: int, clip: float = 1.0, symmetric: bool = True):
    """Fake-quantize every input of ``linear`` per token, after its online transform; returns the hook handle."""
    return _rehook_(linear, input_ops(linear), {"bits": bits, "clip": clip, "symmetric": symmetric})


# ---------------------------------------------------------------- saving: flat tensors + a JSON record

def to_record(transforms: dict[str, list[Op]]) -> tuple[dict, dict[str, torch.Tensor]]:
    """({site: [[kind, fused, [tensor names]], ...]}, {name: tensor}) for the manifest and a safetensors file.
    Linears that share a transform (q/k/v) share its tensors: each is stored once."""
    record, tensors, names = {}, {}, {}
    for site, ops in transforms.items():
        record[site] = []
        for k, op in enumerate(ops):
            keys = []
            for j, t in enumerate(op.tensors):
                if id(t) not in names:
                    names[id(t)] = f"{site}.{k}.{j}"
                    tensors[names[id(t)]] = t.detach().cpu().contiguous()
                keys.append(names[id(t)])
            record[site].append([op.kind, op.fused, keys])
    return record, tensors


def from_record(record: dict, tensors: dict[str, torch.Tensor]) -> dict[str, list[Op]]:
    """Inverse of ``to_record``."""
    return {site: [Op(kind, tuple(tensors[key] for key in keys), fused) for kind, fused, keys in ops]
            for site, ops in record.items()}
