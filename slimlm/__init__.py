"""slimlm: prune, quantize and analyse causal LMs, and decide where in the model to spend the budget.

Python API (the CLI is a thin layer over it)::

    import slimlm
    model, tokenizer = slimlm.load_model("smollm2-135m")
    result = slimlm.prune(model, tokenizer, method="wanda", sparsity=0.5, nsamples=32, seqlen=512)
    slimlm.save(model, tokenizer, "runs/wanda50", result)
    print(slimlm.evaluate(model, tokenizer, windows=4))
"""
from slimlm.version import __version__

# name -> module: imported on first use (PEP 562), so `slimlm --version` and the CLI's argument checks load no torch
_PUBLIC = {"plan_budgets": "slimlm.allocate", "analyze": "slimlm.api", "evaluate": "slimlm.api",
           "prune": "slimlm.api", "quantize": "slimlm.api", "save": "slimlm.api", "calibration": "slimlm.core.calibration",
           "Result": "slimlm.core.result", "SlimlmError": "slimlm.errors", "load_model": "slimlm.core.models",
           "to_gguf": "slimlm.gguf.quantize", "shrink": "slimlm.structured.shrink",
           "lowrank": "slimlm.structured.factorize", "measure_speed": "slimlm.evaluation.speed",
           "apply_runtime": "slimlm.hooks.runtime", "spread_over": "slimlm.core.placement"}

__all__ = ["__version__", *sorted(_PUBLIC, key=str.lower)]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'slimlm' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted([*globals(), *_PUBLIC])
