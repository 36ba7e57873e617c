"""IntactKV: the full-precision model's KV cache of the pivot tokens, prepended at inference.

Reference: Liu et al., "IntactKV: Improving Large Language Model Quantization by Keeping Pivot Tokens Intact", ACL
Findings 2024 (pivot tokens and calibration as its code has them: ruikangliu/IntactKV intactkv/utils.py,
intactkv_train.py). Attention sinks ([BOS], or a fixed system prompt that every request starts with) draw most of
the attention, and quantization error in their keys and values spreads to every later token. IntactKV runs the
full-precision model once on those tokens and keeps its past keys and values; the quantized model then starts every
sequence from that cache instead of computing (and quantizing) it itself.

Modes: ``bos`` = [BOS] alone (IntactKV_[B]); ``prefix`` = [BOS] + a given text (IntactKV_[P]); for a tokenizer
without a BOS token (Qwen's) the prefix alone: the text every request starts with (its chat template's system
turn) is then the attention sink the paper keeps. The prefix is part of every sequence: positions of the input
start after it, and its entries are never quantized (``kvcache.KVQuant.intact``). The optional calibration
(IntactKV_[P]+Cal) trains only these tensors, on the MSE of every layer's output against the full-precision
model (``calibrate_``).
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from slimlm.errors import SlimlmError
from slimlm.hooks.kvcache import kv_specs_
from slimlm.quant.grids import straight_through

HOOK_ATTR = "_slimlm_intact_kv"
MODES = ("bos", "prefix")


def pivot_tokens(tokenizer, mode: str, prefix: str | None = None) -> list[int]:
    """The token ids whose KV is kept: [BOS] (mode bos) or [BOS] + the prefix text (mode prefix; the text alone
    when the tokenizer has no BOS token)."""
    if mode not in MODES:
        raise SlimlmError(f"unknown IntactKV mode '{mode}'; choose {' or '.join(MODES)}")
    if (mode == "prefix") != bool(prefix):
        raise SlimlmError("IntactKV: mode prefix needs a prefix text, and only it takes one")
    if tokenizer is None:
        raise SlimlmError("IntactKV needs the model's tokenizer (its BOS token or the prefix text's tokens)")
    bos = tokenizer.bos_token_id
    if bos is None and mode == "bos":
        raise SlimlmError("IntactKV: this tokenizer has no BOS token; use mode prefix with the text every request "
                          "starts with (e.g. the chat template's system turn)")
    ids = [] if bos is None else [bos]
    if prefix:
        ids += tokenizer(prefix, add_special_tokens=False)["input_ids"]
    return ids


@torch.no_grad()
def pivot_cache(model: nn.Module, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(keys, values)] per layer, each (1, kv_heads, len(tokens), head_dim): the model's own cache of ``tokens``.
    Call it on the full-precision model (rotations that preserve the function are fine)."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([tokens], device=device), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def _prepend(entries):
    from transformers import DynamicCache

    length = entries[0][0].shape[-2]

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            return args, kwargs  # a later step of generation: the cache already starts with the pivots
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch = (ids if ids is not None else kwargs["inputs_embeds"]).shape[0]
        kwargs.pop("past_key_values", None)
        kwargs["cache"] = DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                        for k, v in entries])
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], length), mask], dim=1)
        return args, kwargs
    return hook


def attach_(model: nn.Module, entries: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Start every forward of ``model`` from the pivot cache ``entries`` (its outputs cover the input tokens
    only), and keep those entries out of KV-cache quantization. Replaces an earlier IntactKV hook."""
    detach_(model)
    specs = kv_specs_(model)
    if len(entries) != len(specs):
        raise SlimlmError(f"IntactKV cache has {len(entries)} layers; the model has {len(specs)}")
    for spec in specs:
        spec.intact = entries[0][0].shape[-2]
    setattr(model, HOOK_ATTR, model.register_forward_pre_hook(_prepend(entries), with_kwargs=True))


def detach_(model: nn.Module) -> None:
    if hasattr(model, HOOK_ATTR):
        getattr(model, HOOK_ATTR).remove()
        delattr(model, HOOK_ATTR)


def to_tensors(entries) -> dict[str, torch.Tensor]:
    return {f"intact_kv.{i}.{name}": t.detach().cpu().contiguous()
            for i, pair in enumerate(entries) for name, t in zip(("key", "value"), pair)}


def from_tensors(tensors: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    n = sum(1 for name in tensors if name.startswith("intact_kv.") and name.endswith(".key"))
    return [(tensors[f"intact_kv.{i}.key"], tensors[f"intact_kv.{i}.value"]) for i in range(n)]


@torch.no_grad()
def reference_outputs(model: nn.Module, windows: torch.Tensor,
                      entries: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Every decoder layer's output (n, T, hidden) on ``windows`` after the pivot cache ``entries``: the
    full-precision targets of ``calibrate_`` (call it before quantizing)."""
    attach_(model, entries)
    try:
        outs = [model(input_ids=windows[j:j + 1], output_hidden_states=True, use_cache=False).hidden_states[1:]
                for j in range(windows.shape[0])]
    finally:
        detach_(model)
        for spec in kv_specs_(model):
            spec.intact = 0
    return [torch.cat(layer) for layer in zip(*outs)]


def calibrate_(model: nn.Module, reference: list[torch.Tensor], windows: torch.Tensor,
               entries: list[tuple[torch.Tensor, torch.Tensor]], steps: int = 160, lr: float = 2e-4,
               progress: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """IntactKV_[P]+Cal: train only the pivot entries so that every decoder layer's output on ``windows``
    matches ``reference`` (the full-precision model's layer outputs, one (n, T, hidden) tensor per layer):
    loss = Σ_layers ½·mean((h_quant − h_fp)²). The paper's settings: AdamW-style optimizer at lr 2e-4,
    constant schedule, 160 steps, gradient norm clipped at 0.3; one window per step here (cycled)."""
    params = [nn.Parameter(t.clone().float()) for pair in entries for t in pair]
    pairs = [(params[2 * i], params[2 * i + 1]) for i in range(len(entries))]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.requires_grad_(False)
    for step in tqdm(range(steps), desc="intact-kv", disable=not progress):
        j = step % windows.shape[0]
        attach_(model, pairs)
        with straight_through():  # the quantizers' rounding passes gradients (STE)
            out = model(input_ids=windows[j:j + 1], output_hidden_states=True, use_cache=False)
            loss = sum(0.5 * (h[0] - r[j]).square().mean() for h, r in zip(out.hidden_states[1:], reference))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
    trained = [(k.detach(), v.detach()) for k, v in pairs]
    attach_(model, trained)
    return trained
