"""Weight-analysis time and alpha agreement: slimlm vs WeightWatcher (issue #3), on the built-in model.

WeightWatcher analyses the model with its defaults (power-law fit of each layer's ESD by the `powerlaw`
package, xmin chosen by minimum KS distance over the eigenvalues); slimlm then analyses exactly the layers
WeightWatcher reported, in the same process, side by side. Our `alpha_mle` uses the same estimator (every
eigenvalue a candidate xmin), so its agreement with WeightWatcher's `alpha` is reported; our default
`alpha` (AlphaPruning's xmin_peak rule) is listed beside it.

    pip install weightwatcher && python bench/analysis_time.py
"""
from __future__ import annotations

import json
import logging
import statistics
import time

from common import RESULTS


def main() -> None:
    import torch
    import weightwatcher

    import slimlm
    from slimlm.analysis import weight_metrics_many

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    model, _ = slimlm.load_model("smollm2-135m")
    modules = dict(model.named_modules())
    order = list(modules)  # WeightWatcher's layer_id indexes model.modules() in this order
    start = time.perf_counter()
    details = weightwatcher.WeightWatcher(model=model).analyze(plot=False)
    ww_s = time.perf_counter() - start
    fqns = [order[i] for i in details["layer_id"]]
    names = [n for n in fqns if isinstance(modules[n], torch.nn.Linear)]
    start = time.perf_counter()
    ours = weight_metrics_many({n: modules[n].weight.detach() for n in names})
    ours_s = time.perf_counter() - start
    ww_alpha = dict(zip(fqns, details["alpha"]))
    pairs = [(ww_alpha[n], ours[n]["alpha_mle"], ours[n]["alpha"]) for n in names]
    diffs = [abs(w - m) for w, m, _ in pairs]
    result = {
        "layers": len(names), "weightwatcher_s": ww_s, "slimlm_s": ours_s, "time_ratio": ours_s / ww_s,
        "alpha_mle_vs_ww": {"median_abs_diff": statistics.median(diffs), "max_abs_diff": max(diffs),
                            "within_0.05": sum(d <= 0.05 for d in diffs) / len(diffs),
                            "correlation": statistics.correlation([w for w, _, _ in pairs],
                                                                  [m for _, m, _ in pairs])},
        "alpha_peak_vs_ww_correlation": statistics.correlation([w for w, _, _ in pairs], [p for *_, p in pairs]),
        "per_layer": {n: {"ww_alpha": w, "alpha_mle": m, "alpha_peak": p} for n, (w, m, p) in zip(names, pairs)},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "analysis_time.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_layer"}, indent=1))


if __name__ == "__main__":
    main()
