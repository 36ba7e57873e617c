"""Data-parallel calibration (issue #16): wall-clock of calibration + compression at 1 and 2 processes on this
machine, and a model of the scaling to 8 and 64 GPUs on a 70B Llama.

Measured: ``slimlm prune smollm2-135m --method sparsegpt --sparsity 0.5`` on 32 x 512 calibration tokens (the
first windows of valid.tokens), as one process (2 threads) and as ``torchrun --nproc-per-node 2`` (1 thread each:
the same 2 cores), alternating, ``--repeats`` pairs; ratios pair by pair. Seconds are the manifest's (capture,
forward, compress, communicate, total: calibration + compression, after loading) and the command's wall-clock.

Model (per block, N ranks, one GPU each): forward and Hessian accumulation split over the ranks' windows,
F/(N·R); compression spread round-robin over the block's sets of linears that share an input (4 in a Llama:
q/k/v, o, gate/up, down), so it is bounded by the slowest set, max_set(C_set)/R_c whatever N; the statistics'
all-reduce moves 2(N-1)/N of their float64 bytes over the bus bandwidth, and each changed set's weights are
broadcast once. F and C_set are counted from the model's shapes (2·params per token and pass, two passes; the
lower-triangle Gram, 10/16·2·in² per token, in float32; SparseGPT/GPTQ 2·rows·in² + in³ per set, in float32);
the GPU rates and bandwidths are assumptions written into the JSON (no GPU was measured here); the rates this
machine achieved on each part (measured FLOPs per second of the 1-process run) are written beside them.

    python bench/distributed_scaling.py                      # -> bench/results/distributed_scaling.{json,md}
    python bench/distributed_scaling.py --repeats 1 --nsamples 8 --out /tmp/d.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DEFAULT_DATA, RESULTS, write_json

LLAMA_70B = {"hidden": 8192, "intermediate": 28672, "kv": 1024, "layers": 80}
SMOLLM2_135M = {"hidden": 576, "intermediate": 1536, "kv": 192, "layers": 30}
ASSUMED = {"forward_flops_per_s": 400e12,  # the block's bf16 matmuls on tensor cores, sustained (H100/H200 class)
           "float32_flops_per_s": 50e12,  # Hessian accumulation and GPTQ/SparseGPT's Cholesky and sweeps (float32)
           "intra_node_bus_bytes_per_s": 300e9, "inter_node_bus_bytes_per_s": 50e9}


def sets(shape: dict) -> dict[str, tuple[int, int]]:
    """Per set of linears sharing an input: (output rows, input width)."""
    h, i, kv = shape["hidden"], shape["intermediate"], shape["kv"]
    return {"qkv": (h + 2 * kv, h), "o": (h, h), "gate_up": (2 * i, h), "down": (h, i)}


def block_costs(shape: dict, tokens: int) -> dict:
    """FLOPs and bytes of one block's calibration and compression (see the module docstring)."""
    s = sets(shape)
    params = sum(rows * width for rows, width in s.values())
    hessian = tokens * sum(10 / 16 * 2 * width ** 2 for _, width in s.values())  # lower-triangle Grams
    compress = {name: 2 * rows * width ** 2 + width ** 3 for name, (rows, width) in s.items()}
    stats_bytes = 8 * sum(width ** 2 + 3 * width for _, width in s.values())  # Hessian, norms, totals, maxima
    return {"params": params, "forward_flops": tokens * 2 * 2 * params, "hessian_flops": hessian,
            "compress_flops": compress, "allreduce_bytes": stats_bytes, "broadcast_bytes": 2 * params}  # bf16


def model_seconds(costs: dict, n: int, forward_rate: float, float32_rate: float, bus: float) -> dict:
    forward = (costs["forward_flops"] / forward_rate + costs["hessian_flops"] / float32_rate) / n
    loads = [0.0] * min(n, len(costs["compress_flops"]))
    for k, flops in enumerate(costs["compress_flops"].values()):
        loads[k % len(loads)] += flops / float32_rate
    communicate = 0.0 if n == 1 else (2 * (n - 1) / n * costs["allreduce_bytes"] + costs["broadcast_bytes"]) / bus
    return {"forward": forward, "compress": max(loads), "communicate": communicate,
            "total": forward + max(loads) + communicate}


def run_once(nproc: int, args, out: Path) -> dict:
    cmd = ["prune", "smollm2-135m", "--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", str(args.nsamples),
           "--seqlen", str(args.seqlen), "--calib-sampling", "first", "--data-dir", args.data_dir, "--out", str(out),
           "--quiet"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    argv = [sys.executable, "-m", "slimlm", *cmd] if nproc == 1 else [*launcher, "-m", "slimlm", *cmd]
    env = dict(os.environ, OMP_NUM_THREADS=str(2 // nproc))
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    wall = time.perf_counter() - start
    manifest = json.loads((out / "slimlm.json").read_text())
    return {"processes": nproc, "wall_s": wall, "timings": manifest["timings"]}


def measure(args) -> list[dict]:
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            one, two = (run_once(n, args, Path(tmp) / f"run-{r}-{n}") for n in (1, 2))
            pairs.append({"one": one, "two": two, "ratio_total": two["timings"]["total"] / one["timings"]["total"],
                          "ratio_wall": two["wall_s"] / one["wall_s"]})
            print(json.dumps(pairs[-1]), flush=True)
    return pairs


def projection(pairs: list[dict], args) -> dict:
    """The model with this machine's measured rates (check), and with the assumed GPU rates for 70B."""
    one = pairs[0]["one"]["timings"]
    small = block_costs(SMOLLM2_135M, args.nsamples * args.seqlen)
    blocks = SMOLLM2_135M["layers"]
    cpu = {"forward_and_hessian_flops_per_s": (small["forward_flops"] + small["hessian_flops"]) * blocks
           / one["forward"], "compress_flops_per_s": sum(small["compress_flops"].values()) * blocks / one["compress"]}
    big = block_costs(LLAMA_70B, 128 * 2048)
    gpus = {}
    for n in (1, 8, 64):
        bus = ASSUMED["intra_node_bus_bytes_per_s"] if n <= 8 else ASSUMED["inter_node_bus_bytes_per_s"]
        per_block = model_seconds(big, n, ASSUMED["forward_flops_per_s"], ASSUMED["float32_flops_per_s"], bus)
        gpus[n] = {k: v * LLAMA_70B["layers"] for k, v in per_block.items()}
    return {"cpu_rates_measured": cpu, "assumed": ASSUMED, "llama_70b_block": big, "llama_70b_seconds": gpus,
            "speedup_8": gpus[1]["total"] / gpus[8]["total"], "speedup_64": gpus[1]["total"] / gpus[64]["total"]}


def markdown(pairs: list[dict], model: dict) -> str:
    lines = ["| processes | total s (median) | forward s | compress s | communicate s | wall s |",
             "|---|---|---|---|---|---|"]
    for key, n in (("one", 1), ("two", 2)):
        runs = sorted((p[key] for p in pairs), key=lambda r: r["timings"]["total"])
        mid = runs[len(runs) // 2]
        t = mid["timings"]
        lines.append(f"| {n} | {t['total']:.1f} | {t['forward']:.1f} | {t['compress']:.1f} | "
                     f"{t.get('communicate', 0):.1f} | {mid['wall_s']:.1f} |")
    ratios = ", ".join(f"{p['ratio_total']:.2f}" for p in pairs)
    lines += ["", f"2-process / 1-process total, pair by pair: {ratios}", "",
              "| 70B model, GPUs | forward s | compress s | communicate s | total s | speedup |",
              "|---|---|---|---|---|---|"]
    base = model["llama_70b_seconds"][1]["total"]
    for n, s in model["llama_70b_seconds"].items():
        lines.append(f"| {n} | {s['forward']:.0f} | {s['compress']:.0f} | {s['communicate']:.0f} | "
                     f"{s['total']:.0f} | {base / s['total']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--repeats", type=int, default=2, help="pairs of runs (1 process, then 2)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--out", default=str(RESULTS / "distributed_scaling.json"))
    args = p.parse_args()
    pairs = measure(args)
    model = projection(pairs, args)
    out = write_json(args.out, [{"pairs": pairs, "model": model}])
    out.with_suffix(".md").write_text(markdown(pairs, model) + "\n")
    print(markdown(pairs, model))


if __name__ == "__main__":
    main()
