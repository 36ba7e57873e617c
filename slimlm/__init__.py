"""slimlm: prune, quantize and analyse causal LMs, and decide where in the model to spend the budget.

Python API (the CLI is a thin layer over it)::

    import slimlm
    model, tokenizer = slimlm.load_model("smollm2-135m")
    result = slimlm.prune(model, tokenizer, method="wanda", sparsity=0.5, nsamples=32, seqlen=512)
    slimlm.save(model, tokenizer, "runs/wanda50", result)
    print(slimlm.evaluate(model, tokenizer, windows=4))
"""
from slimlm.version import __version__  # noqa: E402
from slimlm.allocate import plan_budgets  # noqa: E402
from slimlm.api import analyze, evaluate, prune, quantize, save  # noqa: E402
from slimlm.core.calibration import calibration  # noqa: E402
from slimlm.core.result import Result  # noqa: E402
from slimlm.errors import SlimlmError  # noqa: E402
from slimlm.core.models import load_model  # noqa: E402
from slimlm.gguf.quantize import to_gguf  # noqa: E402
from slimlm.structured.shrink import shrink  # noqa: E402
from slimlm.structured.factorize import lowrank  # noqa: E402
from slimlm.evaluation.speed import measure_speed  # noqa: E402
from slimlm.hooks.runtime import apply_runtime  # noqa: E402
from slimlm.core.placement import spread_over  # noqa: E402

__all__ = ["__version__", "Result", "SlimlmError", "analyze", "apply_runtime", "calibration", "evaluate", "load_model",
           "lowrank", "measure_speed", "plan_budgets", "prune", "quantize", "save", "shrink", "spread_over", "to_gguf"]
