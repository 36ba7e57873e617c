"""Simulated KV-cache quantization inside attention, after RoPE, as the W4A4KV4 papers define it.

Keys and values are quantized per token and per head (asymmetric, one group = the head dimension, with a clipping
ratio): QuaRot §4 and FlatQuant's W4A4KV4 scripts (asymmetric, group size 128 = head_dim, scripts/*/w4a4kv4.sh).
Keys are quantized after RoPE, optionally in a rotated basis: q -> q R⁻ᵀ, k -> k R keeps q kᵀ unchanged, so an
orthogonal R (QuaRot's and DuQuant's per-head Hadamard) or a learned invertible one (FlatQuant's key transform)
spreads the keys' outlier channels before they are rounded. The first ``intact`` positions of every sequence
(IntactKV's pivot tokens, ``hooks.intactkv``) are left in full precision.

How: transformers 5 looks attention up by name in ``AttentionInterface``. ``quantize_kv_`` registers
``slimlm_<base>`` (the model's implementation, sdpa or eager, wrapped) and switches the model to it; each
attention module carries its ``KVQuant`` as an attribute, modules without one run the base function unchanged.
The cache holds the unquantized tensors and every call quantizes them again: per-token rounding gives the same
values each time, so the result equals storing quantized entries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimlm.core.architectures import decoder_blocks
from slimlm.errors import SlimlmError
from slimlm.quant.grids import QuantGrid, quantize_activations

KV_ATTR = "_slimlm_kv"
PREFIX = "slimlm_"


@dataclass
class KVQuant:
    """One attention module's KV quantizer. ``bits`` None: no rounding (a key rotation or intact prefix only)."""

    bits: int | None = None
    clip: float = 1.0
    key_rotation: torch.Tensor | None = None   # R (d, d): k -> k R
    query_rotation: torch.Tensor | None = None  # R⁻ᵀ: q -> q R⁻ᵀ
    intact: int = 0  # leading positions kept exact (IntactKV)
    value_clip: float | None = None  # None: ``clip`` for values too

    def __call__(self, query, key, value):
        if self.key_rotation is not None:
            query = query @ self.query_rotation.to(query)
            key = key @ self.key_rotation.to(key)
        if self.bits is not None:
            key = self._quantize(key)
            value = self._quantize(value, self.clip if self.value_clip is None else self.value_clip)
        return query, key, value

    def _quantize(self, x: torch.Tensor, clip: float | None = None) -> torch.Tensor:
        """(batch, heads, positions, head_dim): one asymmetric grid per (head, position)."""
        p = min(self.intact, x.shape[-2])
        clip = self.clip if clip is None else clip
        q = quantize_activations(x[..., p:, :], self.bits, clip, symmetric=False).to(x.dtype)
        return torch.cat([x[..., :p, :], q], dim=-2) if p else q


def _register(base: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base not in ("sdpa", "eager"):
        raise SlimlmError(f"KV-cache quantization wraps sdpa or eager attention; the model uses '{base}'")
    name = PREFIX + base

    def attention(module, query, key, value, attention_mask, **kwargs):
        spec = getattr(module, KV_ATTR, None)
        if spec is not None:
            query, key, value = spec(query, key, value)
        if base == "eager":
            from transformers.models.llama.modeling_llama import eager_attention_forward
            return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def attention_modules(model: nn.Module) -> list[nn.Module]:
    blocks = decoder_blocks(model)
    if not all(hasattr(block, "self_attn") and hasattr(block.self_attn, "head_dim") for block in blocks):
        raise SlimlmError(f"'{model.config.model_type}' has no attention with a KV cache that slimlm can reach")
    return [block.self_attn for block in blocks]


def kv_specs_(model: nn.Module) -> list[KVQuant]:
    """Every attention module's ``KVQuant`` (created empty where missing), with the model switched to slimlm's
    attention wrapper. Idempotent."""
    modules = attention_modules(model)
    current = model.config._attn_implementation
    if not current.startswith(PREFIX):
        model.set_attn_implementation(_register(current))
    for module in modules:
        if getattr(module, KV_ATTR, None) is None:
            setattr(module, KV_ATTR, KVQuant())
    return [getattr(module, KV_ATTR) for module in modules]


def quantize_kv_(model: nn.Module, bits: int, clip: float = 1.0, key_rotation: torch.Tensor | None = None) -> None:
    """Quantize the KV cache of every layer to ``bits`` (2..8) per head and token, keys in the basis of
    ``key_rotation`` (orthogonal or invertible, head_dim × head_dim; None: the model's own basis)."""
    try:
        QuantGrid(bits, False, None, clip)
    except SlimlmError as e:
        raise SlimlmError(f"KV-cache quantization: {e}") from None
    modules = attention_modules(model)
    if key_rotation is not None and key_rotation.shape[0] != modules[0].head_dim:
        raise SlimlmError(f"key rotation is {key_rotation.shape[0]}-dimensional; the heads are "
                          f"{modules[0].head_dim}")
    query_rotation = None if key_rotation is None else torch.linalg.inv(key_rotation.double()).mT
    for spec in kv_specs_(model):
        spec.bits, spec.clip = bits, clip
        if key_rotation is not None:
            spec.key_rotation, spec.query_rotation = key_rotation.float(), query_rotation.float()
