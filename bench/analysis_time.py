"""Weight-analysis time and alpha agreement: slimlm vs WeightWatcher (issue #3), on the built-in model.

WeightWatcher analyses the model with its defaults (ESD by float64 SVD, power-law fit by its own ``WWFit``:
eigenvalues ≤ 1e-5 dropped, every remaining eigenvalue but the largest an xmin candidate, the one with the smallest
KS distance max_j |F_j − j/n| wins); slimlm then analyses exactly the layers WeightWatcher reported, in the same
process, side by side, on ``--device``. Our ``alpha_mle`` is the same estimator, so its agreement with
WeightWatcher's ``alpha`` (and xmin) is reported; our default ``alpha`` (AlphaPruning's xmin_peak rule) is listed
beside it. Timing noise: ``--repeats`` runs both tools that many times, interleaved, and keeps each one's fastest
wall time; process CPU time is recorded too, and the load average before and after (the machine may be shared).
``--threads N`` pins every thread pool (torch, MKL, OpenMP, OpenBLAS under scipy) to N threads per call.

    pip install weightwatcher && python bench/analysis_time.py [--repeats 3] [--threads 1] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

from common import RESULTS


def agreement(ours: list[float], theirs: list[float]) -> dict:
    diffs = [abs(a - b) for a, b in zip(ours, theirs)]
    return {"median_abs_diff": statistics.median(diffs), "max_abs_diff": max(diffs),
            "within_1e-6": sum(d <= 1e-6 for d in diffs) / len(diffs),
            "correlation": statistics.correlation(ours, theirs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each tool, fastest kept")
    parser.add_argument("--device", default=None, help="where slimlm computes (default: where the weights are)")
    parser.add_argument("--threads", type=int, default=None, help="threads per BLAS/LAPACK/torch call (default: "
                        "each library's own)")
    args = parser.parse_args()
    if args.threads:  # before numpy/scipy/torch load their BLAS
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(args.threads)

    import torch
    import weightwatcher

    import slimlm
    from slimlm.analysis.spectra import batched_esd, weight_metrics_many

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    model, _ = slimlm.load_model("smollm2-135m")
    modules = dict(model.named_modules())
    order = list(modules)  # WeightWatcher's layer_id indexes model.modules() in this order
    load_before = os.getloadavg()
    ww_times, ours_times, esd_times, ww_cpu, ours_cpu = [], [], [], [], []
    for _ in range(args.repeats):
        start, cpu = time.perf_counter(), time.process_time()
        details = weightwatcher.WeightWatcher(model=model).analyze(plot=False)
        ww_times.append(time.perf_counter() - start)
        ww_cpu.append(time.process_time() - cpu)
        fqns = [order[i] for i in details["layer_id"]]
        names = [n for n in fqns if isinstance(modules[n], torch.nn.Linear)]
        weights = [modules[n].weight.detach() for n in names]
        start, cpu = time.perf_counter(), time.process_time()
        ours = weight_metrics_many(dict(zip(names, weights)), args.device)
        ours_times.append(time.perf_counter() - start)
        ours_cpu.append(time.process_time() - cpu)
        start = time.perf_counter()  # its first part again, alone: the split between spectra and fits
        eigs = batched_esd(weights, args.device)
        esd_times.append(time.perf_counter() - start)
    ww = {n: (a, x) for n, a, x in zip(fqns, details["alpha"], details["xmin"])}
    result = {
        "layers": len(names), "weightwatcher_version": weightwatcher.__version__, "device": str(eigs[0].device),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "repeats": args.repeats,
        "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg(),
        "weightwatcher_s": min(ww_times), "slimlm_s": min(ours_times), "time_ratio": min(ours_times) / min(ww_times),
        "slimlm_esd_s": min(esd_times),  # batched_esd alone; the rest of slimlm_s is the fits
        "all_runs_s": {"weightwatcher": ww_times, "slimlm": ours_times},
        "all_runs_cpu_s": {"weightwatcher": ww_cpu, "slimlm": ours_cpu},
        "alpha_mle_vs_ww": agreement([ours[n]["alpha_mle"] for n in names], [ww[n][0] for n in names]),
        "xmin_mle_vs_ww": agreement([ours[n]["xmin_mle"] for n in names], [ww[n][1] for n in names]),
        "alpha_peak_vs_ww_correlation": statistics.correlation([ours[n]["alpha"] for n in names],
                                                               [ww[n][0] for n in names]),
        "per_layer": {n: {"ww_alpha": ww[n][0], "alpha_mle": ours[n]["alpha_mle"], "ww_xmin": ww[n][1],
                          "xmin_mle": ours[n]["xmin_mle"], "alpha_peak": ours[n]["alpha"]} for n in names},
    }
    RESULTS.mkdir(exist_ok=True)
    name = f"analysis_time_threads{args.threads}.json" if args.threads else "analysis_time.json"
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_layer"}, indent=1))


if __name__ == "__main__":
    main()
