"""Depth: remove whole decoder blocks, chosen by a score measured on calibration data.

Scores (lower = removed first):
  * ``influence``: ShortGPT's Block Influence (Men et al. 2024, eq. 1), BI_i = 1 − mean over tokens of
    cos(x_i, x_{i+1}), the cosine between a block's input and output hidden states on the dense model.
  * ``loss``: slimlm's own, the measured increase of the calibration loss (mean next-token NLL) when block i
    alone is skipped. BI says how much a block turns the residual stream; this says what that turn is worth
    to the output, which is what removal costs.
Both can be ``iterative``: remove the lowest block, score the smaller model again, repeat (ShortGPT scores
once; later blocks' scores change once an earlier one is gone, which one-shot scoring cannot see).

The result is a plain Hugging Face model with fewer layers: the kept blocks are renumbered (their attention's
``layer_idx`` indexes the KV cache), ``num_hidden_layers`` and per-layer config lists (``layer_types``) follow.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from slimlm.core.architectures import adapter_for, decoder_blocks
from slimlm.core.engine import DEFAULT_BATCH_TOKENS, _batches, capture_inputs, run_block
from slimlm.errors import SlimlmError

SCORES = ("influence", "loss")
PER_LAYER_CONFIG = ("layer_types",)  # config lists with one entry per decoder layer


def check_llama_like(model) -> None:
    """Structured methods rebuild attention and MLP shapes of Llama-family blocks (q/k/v/o, gate/up/down)."""
    if adapter_for(model).blocks != "model.layers":
        raise SlimlmError(f"structured compression supports Llama-family models (llama, mistral, qwen2/3, gemma); "
                          f"not '{model.config.model_type}'")


@torch.no_grad()
def block_inputs(model, windows: torch.Tensor, device, batch_size: int, progress: bool = True):
    """The dense model's hidden states entering every block and leaving the last: a list of L + 1 tensors."""
    captured = capture_inputs(model, windows, batch_size, device)
    states = [captured.hidden]
    for i, block in enumerate(tqdm(decoder_blocks(model), desc="block states", disable=not progress)):
        block.to(device)
        states.append(run_block(block, states[-1], captured.call_args[i], batch_size))
        block.to("cpu")
    return states


def influence_scores(states: list[torch.Tensor]) -> list[float]:
    """ShortGPT's BI_i = 1 − E_tokens[cos(x_i, x_{i+1})] from the hidden states around each block."""
    return [1 - F.cosine_similarity(x.float(), y.float(), dim=-1).mean().item() for x, y in zip(states, states[1:])]


@torch.no_grad()
def tail_loss(model, start: int, hidden: torch.Tensor, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token NLL of ``windows`` when ``hidden`` enters block ``start`` (``start`` = L: straight to the
    final norm and head). The model's own forward runs with blocks before ``start`` passing their input through
    and ``hidden`` as the embeddings, so final norms, logit soft-capping and the loss are the model's own."""
    blocks = decoder_blocks(model)
    for block in blocks[:start]:
        block.forward = _identity
    device = next(model.parameters()).device
    try:
        total = 0.0
        for s, e in _batches(windows.shape[0], batch_size):
            out = model(inputs_embeds=hidden[s:e].to(device), labels=windows[s:e].to(device), use_cache=False)
            total += out.loss.item() * (e - s)
    finally:
        for block in blocks[:start]:
            del block.forward
    return total / windows.shape[0]


def _identity(hidden_states, *args, **kwargs):
    return hidden_states


def skip_losses(model, windows: torch.Tensor, states: list[torch.Tensor], batch_size: int,
                progress: bool = True) -> list[float]:
    """slimlm's depth score: loss with block i skipped minus the dense loss, for every i (block i's input goes
    straight to block i + 1)."""
    dense = tail_loss(model, len(states) - 1, states[-1], windows, batch_size)
    return [tail_loss(model, i + 1, states[i], windows, batch_size) - dense
            for i in tqdm(range(len(states) - 1), desc="skip losses", disable=not progress)]


def block_scores(model, windows: torch.Tensor, score: str, device="cpu", batch_size: int | None = None,
                 progress: bool = True) -> list[float]:
    """One score per decoder block (lower = cheaper to remove)."""
    if score not in SCORES:
        raise SlimlmError(f"unknown depth score '{score}'; choose {' or '.join(SCORES)}")
    batch_size = batch_size or max(1, DEFAULT_BATCH_TOKENS // windows.shape[1])
    states = block_inputs(model, windows, device, batch_size, progress)
    if score == "influence":
        return influence_scores(states)
    return skip_losses(model, windows, states, batch_size, progress)


def check_drop(n_blocks: int, drop: int) -> None:
    if not 0 < drop < n_blocks:
        raise SlimlmError(f"--drop-layers must be between 1 and {n_blocks - 1} (the model has {n_blocks} decoder "
                          f"layers), got {drop}")


def choose_blocks(model, windows: torch.Tensor, drop: int, score: str, iterative: bool = False, device="cpu",
                  batch_size: int | None = None, progress: bool = True) -> tuple[list[int], list[dict]]:
    """The ``drop`` blocks to remove (original indices, ascending) and, per round, the scores seen. One-shot:
    the ``drop`` lowest scores of the dense model. Iterative: remove the lowest, score the rest again; the model
    is left with those blocks removed either way."""
    check_drop(len(decoder_blocks(model)), drop)
    remaining, removed, rounds = list(range(len(decoder_blocks(model)))), [], []
    while len(removed) < drop:
        scores = block_scores(model, windows, score, device, batch_size, progress)
        rounds.append({"blocks": list(remaining), "scores": scores})
        order = sorted(range(len(scores)), key=scores.__getitem__)
        take = order[:1] if iterative else order[:drop]
        drop_blocks_(model, take)
        removed += [remaining[i] for i in take]
        remaining = [b for i, b in enumerate(remaining) if i not in take]
    return sorted(removed), rounds


def drop_blocks_(model, indices) -> None:
    """Remove decoder blocks ``indices`` in place; the kept blocks are renumbered and the config follows."""
    blocks, indices = decoder_blocks(model), set(indices)
    keep = [block for i, block in enumerate(blocks) if i not in indices]
    if not keep:
        raise SlimlmError("cannot remove every decoder layer")
    parent, _, name = adapter_for(model).blocks.rpartition(".")
    setattr(model.get_submodule(parent), name, nn.ModuleList(keep))
    for new, block in enumerate(keep):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new  # the KV cache is indexed by it
    config = model.config
    for key in PER_LAYER_CONFIG:
        if isinstance(getattr(config, key, None), list):
            setattr(config, key, [v for i, v in enumerate(getattr(config, key)) if i not in indices])
    config.num_hidden_layers = len(keep)
