"""Where each architecture keeps its decoder blocks and linear layers, and which block an FQN belongs to.

Architecture knowledge is one small table (``ADAPTERS``): where the decoder blocks live. Everything else the
block loop needs (rotary embeddings, masks, position ids) is captured generically from the model's own forward,
so no architecture is special-cased in the engine.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class Adapter:
    """Where an architecture keeps its decoder blocks (dotted path from the CausalLM root)."""

    blocks: str


_LLAMA_LIKE = Adapter(blocks="model.layers")
# model_type -> adapter. Llama-family models share one layout; OPT nests a decoder. Each one is built tiny and
# pruned, saved and reloaded by tests/test_architectures.py. Mixture-of-experts models (Mixtral, Qwen-MoE) are not
# listed: their experts are 3-D parameters, not linears, and would be left uncompressed.
ADAPTERS = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "opt": Adapter(blocks="model.decoder.layers"),
}


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise SlimlmError(
            f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks, in order."""
    return model.get_submodule(adapter_for(model).blocks)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Linear layers of one block, keyed by their name inside the block (e.g. ``self_attn.q_proj``)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def linear_fqns(model: nn.Module) -> dict[str, nn.Linear]:
    """Every prunable linear (those inside decoder blocks), keyed by fully qualified name."""
    prefix = adapter_for(model).blocks
    out = {}
    for i, block in enumerate(decoder_blocks(model)):
        for name, lin in block_linears(block).items():
            out[f"{prefix}.{i}.{name}"] = lin
    return out


BLOCK_PATTERN = r"^((?:.*?\.)?(?:layers|h|blocks)\.\d+)\."  # first "<...>.layers.<i>." (HF Llama/OPT, GPT-2 "h")


def block_of(fqn: str, pattern: str = BLOCK_PATTERN) -> str:
    """The transformer block an FQN belongs to (``model.layers.3.mlp.up_proj`` -> ``model.layers.3``).

    Parsed from the name, never from the position in a list, so any subset or order of layers groups correctly.
    An FQN outside every block (``lm_head``) is a group of its own.
    """
    match = re.match(pattern, fqn)
    return match.group(1) if match else fqn
