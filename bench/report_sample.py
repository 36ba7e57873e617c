"""50 hand-made run folders for looking at `slimlm report` at scale (bench/results/report_50runs.png).

The manifests carry the fields real runs record on the built-in model (30 Llama blocks, 7 linears each):
prune runs of four methods at several sparsities and allocations, 2:4 runs, a joint prune + 4-bit run,
quantize runs at 2/3/4/8 bits with several group sizes, rotation, mixed precision, an old manifest with
almost nothing in it, and an analysis folder. Perplexities follow a made-up smooth law (dense 24.6),
they are not measurements.

    python bench/report_sample.py /tmp/runs50 && python -m slimlm report /tmp/runs50
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

MODEL = "smollm2-135m"
DENSE_PPL = 24.6
KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"]
LAYERS = [(b, f"model.layers.{b}.{kind}") for b in range(30) for kind in KINDS]
# how fast perplexity grows with sparsity or with fewer bits (made up, ordered as in the papers)
PRUNE_RATE = {"magnitude": 12.0, "wanda": 7.0, "ria": 6.5, "sparsegpt": 6.0}
ALLOCATION_GAIN = {"uniform": 1.0, "owl": 0.9, "alphapruning": 0.88, "errortable": 0.85, "fisher": 0.83}
QUANT_RATE = {"rtn": 4.5, "gptq": 2.5}
GROUP_GAIN = {32: 0.8, 64: 0.9, 128: 1.0, None: 1.6}


def _ppl(value: float, windows: int = 8, seqlen: int = 2048) -> dict:
    return {"dataset": "wikitext2", "perplexity": round(value, 4), "windows": windows, "seqlen": seqlen}


def _spread(block: int, width: float) -> float:
    """A smooth per-block offset in [-width, width]: early blocks get less, late blocks more."""
    return width * math.tanh((block - 14.5) / 8)


def prune_run(method: str, sparsity: float, allocation: str = "uniform", pattern: str = "unstructured",
              wbits: int | None = None, windows: int = 8) -> dict:
    rate = PRUNE_RATE[method] * ALLOCATION_GAIN[allocation] * (1.6 if pattern != "unstructured" else 1.0)
    width = {"uniform": 0.0, "owl": 0.08, "alphapruning": 0.15}.get(allocation, 0.05)
    layers = {f: {"target": round(sparsity + _spread(b, width), 4)} for b, f in LAYERS}
    for rec in layers.values():
        rec["sparsity"] = rec["target"]
    manifest = {"kind": "prune", "method": method, "pattern": pattern, "sparsity_target": sparsity,
                "sparsity": sparsity - 0.0002 * (allocation != "uniform"), "allocation": {"name": allocation},
                "model": MODEL, "layers": layers,
                "timings": {"total": {"magnitude": 3.0, "wanda": 70.0, "ria": 75.0, "sparsegpt": 160.0}[method]},
                "metrics": {"perplexity": _ppl(DENSE_PPL * math.exp(rate * sparsity ** 2.5)
                                               * (1.05 if wbits else 1.0), windows)}}
    if wbits:
        manifest["quantization"] = {"wbits": wbits, "group_size": 128, "symmetric": True}
        manifest["storage"] = {"bytes_per_param": 0.71}
    if method == "sparsegpt" and allocation == "uniform" and pattern == "unstructured":
        acc = 0.66 - 0.3 * sparsity ** 2
        manifest["metrics"]["zero_shot"] = {"tasks": {"piqa": {"acc": acc, "acc_stderr": 0.011},
                                                      "arc_easy": {"acc_norm": acc - 0.15}}}
    return manifest


def quantize_run(method: str, wbits: int, group_size: int | None = 128, avg_bits: float | None = None,
                 abits: int | None = None) -> dict:
    bits = avg_bits - 0.04 if avg_bits else float(wbits)
    rate = QUANT_RATE[method] * GROUP_GAIN[group_size] * (1.3 if abits else 1.0)
    # mixed precision: a scattered share (avg_bits - 2) / 2 of the blocks at 4 bits, the rest at 2
    layer_bits = {f: wbits if not avg_bits else 2 + 2 * ((7 * b) % 30 < 15 * (avg_bits - 2)) for b, f in LAYERS}
    group_bytes = 0 if group_size is None else 4 / group_size  # one float32 scale per group
    return {"kind": "quantize", "method": method, "wbits": wbits, "group_size": group_size, "symmetric": True,
            "abits": abits, "rotation": {"online_down": True} if abits else None, "bits": bits,
            "allocation": {"name": "alphapruning" if avg_bits else "uniform", "avg_bits": avg_bits},
            "model": MODEL, "layers": {f: {"bits": b} for f, b in layer_bits.items()},
            "storage": {"bytes_per_param": round(0.35 + 0.78 * (bits / 8 + group_bytes), 4)},
            "timings": {"total": 2.5 if method == "rtn" else 240.0},
            "metrics": {"perplexity": _ppl(DENSE_PPL * math.exp(rate * 4.0 ** (2 - bits)))}}


def runs() -> dict[str, dict]:
    """Folder name -> manifest of 49 runs (the analysis folder is the 50th)."""
    out = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        for s in (0.4, 0.5, 0.6, 0.7):
            out[f"prune/{MODEL}-{method}-{s}"] = prune_run(method, s)
    for method in ("wanda", "sparsegpt"):
        for s in (0.5, 0.6, 0.7):
            out[f"prune/{MODEL}-{method}-{s}-owl"] = prune_run(method, s, "owl")
    for s in (0.5, 0.6, 0.7):
        out[f"prune/{MODEL}-sparsegpt-{s}-alphapruning"] = prune_run("sparsegpt", s, "alphapruning")
    for s in (0.6, 0.7):
        out[f"prune/{MODEL}-sparsegpt-{s}-fisher"] = prune_run("sparsegpt", s, "fisher")
        out[f"prune/{MODEL}-ria-{s}"] = prune_run("ria", s)
    out[f"prune/{MODEL}-wanda-0.6-errortable"] = prune_run("wanda", 0.6, "errortable")
    for method in ("magnitude", "wanda", "sparsegpt", "ria"):
        out[f"prune/{MODEL}-{method}-2-4"] = prune_run(method, 0.5, pattern="2:4")
    out[f"prune/{MODEL}-sparsegpt-0.5-w4"] = prune_run("sparsegpt", 0.5, wbits=4)
    out[f"prune/short-eval/{MODEL}-wanda-0.5-one-window-check"] = prune_run("wanda", 0.5, windows=1)
    for method in ("rtn", "gptq"):
        for wbits in (2, 3, 4, 8):
            out[f"quant/{MODEL}-{method}-w{wbits}"] = quantize_run(method, wbits)
    for group in (32, 64, None):
        out[f"quant/{MODEL}-gptq-w4-g{group or 'channel'}"] = quantize_run("gptq", 4, group)
    out[f"quant/{MODEL}-rtn-w4a4-rotated"] = quantize_run("rtn", 4, abits=4)
    out[f"quant/{MODEL}-gptq-w4a4-rotated"] = quantize_run("gptq", 4, abits=4)
    for avg in (2.5, 3.0, 3.5):
        out[f"quant/{MODEL}-gptq-w{avg:g}-alphapruning"] = quantize_run("gptq", 4, avg_bits=avg)
    out["old/hand-made"] = {"method": "sparsegpt"}  # an old manifest: everything else missing
    return out


def write_sample(root: Path) -> int:
    manifests = runs()
    manifests["analysis/" + MODEL] = {"kind": "analysis", "model": MODEL}
    for name, manifest in manifests.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "slimlm.json").write_text(json.dumps(manifest, indent=1) + "\n")
    alphas = [{"name": f, "block": b, "kind": f.split(".", 3)[3],
               "alpha": round(3.2 + _spread(b, 1.0) + 0.15 * (i % len(KINDS)) - 0.02 * (b % 3), 3)}
              for i, (b, f) in enumerate(LAYERS)]
    (root / "analysis" / MODEL / "metrics.json").write_text(json.dumps(alphas, indent=1) + "\n")
    return len(manifests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="folder to fill with run folders")
    out = parser.parse_args().out
    print(json.dumps({"out": out, "runs": write_sample(Path(out))}))


if __name__ == "__main__":
    main()
