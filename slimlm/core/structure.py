"""Saved models whose linears are not the ones their config builds: per-block widths, low-rank factors.

A structured run records the shape of every decoder-block linear in its manifest (``structure``): input and
output size, bias, and for a factorized one its rank (stored as two linears, ``0`` then ``1``, as
``nn.Sequential`` names them). ``rebuild_`` makes a freshly configured model take those shapes so that the saved
state dict loads into it exactly; ``load_structured`` does both. Plain ``transformers`` refuses such a folder
(shape mismatch) rather than loading wrong weights; where the config can say the new shapes (uniform widths of
a Llama, fewer layers) it loads it as well.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from slimlm.core.architectures import linear_fqns
from slimlm.errors import SlimlmError


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


def rebuild_(model, record: dict[str, dict]) -> None:
    """Give ``model``'s linears the recorded shapes (uninitialised weights, the model's dtype)."""
    dtype = next(model.parameters()).dtype
    for fqn, spec in record.items():
        parent, _, name = fqn.rpartition(".")
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


def structure_record(model) -> dict[str, dict] | None:
    """``describe(model)`` where its linears differ from the ones its config builds, else None (the config alone
    rebuilds the model, as for fewer layers or uniform widths the config states)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(model.config)
    ours = describe(model)
    return ours if ours != describe(fresh) else None


def load_structured(folder: str | Path, record: dict[str, dict], dtype: torch.dtype):
    """The model saved in ``folder`` (config + safetensors) with the linears of ``record``; every saved tensor
    must load and every parameter be loaded (a tied output head excepted)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    rebuild_(model, record)
    missing, unexpected = model.load_state_dict(_state_dict(folder), strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise SlimlmError(f"cannot load the structured model in {folder}: "
                          f"{'unexpected ' + unexpected[0] if unexpected else 'missing ' + sorted(set(missing) - tied)[0]}")
    model.tie_weights()
    return model.to(dtype)
