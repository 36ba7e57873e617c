"""Saved models whose modules are not the ones their config builds: per-block widths, low-rank factors,
SliceGPT's sliced residual stream.

A structured run records in its manifest (``structure``) the shape of every decoder-block linear (``linears``:
input and output size, bias, and for a factorized one its rank, stored as two linears ``0`` then ``1`` as
``nn.Sequential`` names them; SliceGPT's skip matrices ``attn_shortcut``/``mlp_shortcut``, which make the block a
``SlicedLayer``) and, for a sliced model, the config fields its modules follow instead of the saved config
(``config``: the sliced hidden size, the unchanged head size, the rescaled RMSNorm epsilon). ``build`` makes a
model of those shapes so that the saved state dict loads into it exactly; ``load_structured`` also loads it.
The saved config.json keeps the dense sizes on purpose: plain ``transformers`` then refuses the folder (shape
mismatch) rather than loading it without its skip matrices or factors, which it would only warn about. Where
the config can say the new shapes (uniform widths of a Llama, fewer layers) plain transformers loads it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from slimlm.core.architectures import decoder_blocks, linear_fqns
from slimlm.errors import SlimlmError

SHORTCUTS = ("attn_shortcut", "mlp_shortcut")


def attention_branch(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """A Llama-family layer's attention output for residual ``x`` (before the residual add)."""
    return layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)[0]


def mlp_branch(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer.mlp(layer.post_attention_layernorm(x))


class SlicedLayer(nn.Module):
    """A Llama-family decoder layer whose skip connections are linears (SliceGPT §3.4, Fig. 4): the residual
    enters in one basis, attention's writer and ``attn_shortcut`` both produce the MLP's basis, the MLP's writer
    and ``mlp_shortcut`` the next layer's. Called like the layer it wraps; returns the hidden states tensor."""

    def __init__(self, layer: nn.Module, attn_shortcut: nn.Linear, mlp_shortcut: nn.Linear):
        super().__init__()
        self.input_layernorm, self.self_attn = layer.input_layernorm, layer.self_attn
        self.post_attention_layernorm, self.mlp = layer.post_attention_layernorm, layer.mlp
        self.attn_shortcut, self.mlp_shortcut = attn_shortcut, mlp_shortcut
        if hasattr(layer, "attention_type"):  # models with sliding-window layers pick their mask by it
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        x = self.attn_shortcut(hidden_states) + attention_branch(self, hidden_states, kwargs)
        return self.mlp_shortcut(x) + mlp_branch(self, x)


def describe(model) -> dict[str, dict]:
    """FQN -> {in, out, bias[, rank]} of every module in the decoder blocks that computes a linear map."""
    record = {}
    for fqn, lin in linear_fqns(model).items():
        parent, _, name = fqn.rpartition(".")
        if name in ("0", "1") and isinstance(model.get_submodule(parent), nn.Sequential):
            first, second = model.get_submodule(parent)
            record[parent] = {"in": first.in_features, "out": second.out_features, "bias": second.bias is not None,
                              "rank": first.out_features}
        else:
            record[fqn] = {"in": lin.in_features, "out": lin.out_features, "bias": lin.bias is not None}
    return record


def rebuild_(model, linears: dict[str, dict]) -> None:
    """Give ``model``'s linears the recorded shapes (uninitialised weights, the model's dtype); a block with
    skip matrices becomes a ``SlicedLayer``."""
    dtype = next(model.parameters()).dtype
    for fqn, spec in linears.items():
        parent, _, name = fqn.rpartition(".")
        if name in SHORTCUTS and not isinstance(model.get_submodule(parent), SlicedLayer):
            blocks, _, index = parent.rpartition(".")
            identity = nn.Linear(1, 1, bias=False)  # replaced just below, as is its twin
            model.get_submodule(blocks)[int(index)] = SlicedLayer(model.get_submodule(parent), identity, identity)
        if "rank" in spec:
            module = nn.Sequential(nn.Linear(spec["in"], spec["rank"], bias=False, dtype=dtype),
                                   nn.Linear(spec["rank"], spec["out"], bias=spec["bias"], dtype=dtype))
        else:
            module = nn.Linear(spec["in"], spec["out"], bias=spec["bias"], dtype=dtype)
        setattr(model.get_submodule(parent), name, module)


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    state = {}
    for name in files:
        state |= load_file(folder / name)
    return state


def config_changes(model) -> dict:
    """Config fields whose values the model's modules follow instead of its config's: after SliceGPT the
    embedding is d' wide while the config keeps d (module docstring), with the head size and the final norm's
    epsilon the sliced modules use. Read from the modules, so they cannot contradict what was done."""
    hidden = model.get_input_embeddings().embedding_dim
    if hidden == model.config.hidden_size:
        return {}
    return {"hidden_size": hidden, "head_dim": decoder_blocks(model)[0].self_attn.head_dim,
            "rms_norm_eps": model.get_submodule("model.norm").variance_epsilon}


def build(config, record: dict, dtype: torch.dtype | None = None):
    """A model of ``config`` with the structure ``record`` (``structure_record``'s form), weights uninitialised;
    its config keeps the given values, as the model ``record`` describes did."""
    from transformers import AutoModelForCausalLM

    changes = record.get("config", {})
    kept = {key: getattr(config, key) for key in changes}
    for key, value in changes.items():
        setattr(config, key, value)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        for key, value in kept.items():
            setattr(config, key, value)
    for key, value in kept.items():
        setattr(model.config, key, value)
    rebuild_(model, record.get("linears", {}))
    return model


def structure_record(model) -> dict | None:
    """``{"linears": describe(model)[, "config": config_changes(model)]}`` where the model differs from what its
    config builds, else None (the config alone rebuilds it, as for fewer layers or uniform widths it states)."""
    changes = config_changes(model)
    with torch.device("meta"):
        fresh = build(model.config, {"config": changes})
    ours = describe(model)
    if ours == describe(fresh) and not changes:
        return None
    return {"linears": ours} | ({"config": changes} if changes else {})


def load_structured(folder: str | Path, record: dict, dtype: torch.dtype):
    """The model saved in ``folder`` (config + safetensors) with the structure of ``record``; every saved tensor
    must load and every parameter be loaded (a tied output head excepted)."""
    from transformers import AutoConfig

    folder = Path(folder)
    model = build(AutoConfig.from_pretrained(folder), record, dtype)
    missing, unexpected = model.load_state_dict(_state_dict(folder), strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise SlimlmError(f"cannot load the structured model in {folder}: "
                          f"{'unexpected ' + unexpected[0] if unexpected else 'missing ' + sorted(set(missing) - tied)[0]}")
    model.tie_weights()
    return model.to(dtype)
