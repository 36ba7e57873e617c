"""Structured compression of the built-in model at 20% and 35% fewer decoder parameters (issue #14): depth
(ShortGPT's block influence, slimlm's skip-loss score), width (FLAP, slimlm's Fisher units and allocation), low rank
(SVD-LLM, WeLore, SVD-LLM with slimlm's Fisher-priced ranks), SliceGPT.

Protocol (bench/common.py): calibration = the first 32 windows of 512 tokens of wikitext2/valid.tokens (depth
scores: the first 8 of them, as the skip-loss score runs the model's tail once per layer); perplexity on the
first ``--eval-windows`` windows of 2048 tokens of test.raw. Per row, measured beside the dense model in the same
invocation, models alternating (``slimlm.evaluation.speed``): transformers decode tokens/s (batch 1, CPU float32)
and llama.cpp tg tokens/s (F16 GGUF, llama-bench), each as a ratio to dense; parameters and file size as ratios.
Low-rank and SliceGPT rows have no GGUF (llama.cpp holds neither factors nor SliceGPT's shortcut matrices).
Then the best depth row and the dense model as Q4_K_M (slimlm gguf, GPTQ): llama-perplexity (ctx 512) and tg.

    bash scripts/build_llama_cpp.sh && python bench/structured_table.py [--eval-windows 8] [--rows flap,...]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from common import DEFAULT_DATA, RESULTS, protocol_windows

DECODER_LAYERS = 30  # the built-in model's


def rows(cut: float) -> dict[str, tuple[str, dict]]:
    """Row name -> (function, its settings) at ``cut`` (fraction of decoder parameters removed)."""
    drop = math.ceil(cut * DECODER_LAYERS - 1e-9)
    keep = round(1 - cut, 4)
    return {
        "shortgpt": ("shrink", {"drop_layers": drop, "score": "influence"}),
        "influence-iterative": ("shrink", {"drop_layers": drop, "score": "influence", "iterative": True}),
        "depth-loss (ours)": ("shrink", {"drop_layers": drop, "score": "loss"}),
        "flap": ("shrink", {"params": keep, "method": "flap", "allocation": "flap"}),
        "flap-uniform": ("shrink", {"params": keep, "method": "flap", "allocation": "uniform"}),
        "width-fisher (ours)": ("shrink", {"params": keep, "method": "fisher", "allocation": "fisher"}),
        "svdllm": ("lowrank", {"params": keep, "method": "svdllm", "allocation": "uniform"}),
        "welore": ("lowrank", {"params": keep, "method": "welore", "allocation": "welore"}),
        "svdllm-fisher (ours)": ("lowrank", {"params": keep, "method": "svdllm", "allocation": "fisher"}),
        "slicegpt": ("shrink", {"params": keep, "method": "slicegpt", "allocation": "uniform"}),
    }


def compress(kind: str, settings: dict, model, tok, calib) -> dict:
    if kind == "shrink":
        from slimlm.structured.shrink import shrink
        depth_calib = calib[:8] if "drop_layers" in settings else calib
        return shrink(model, tok, calib=depth_calib, progress=False, **settings).manifest
    from slimlm.structured.factorize import lowrank
    return lowrank(model, tok, calib=calib, progress=False, **settings).manifest


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


def speeds(dense: tuple[Path, Path | None], row: tuple[Path, Path | None], repeats: int) -> dict:
    """Decode tok/s ratios to dense, transformers (folders) and llama.cpp (F16 GGUF files), models alternating."""
    from slimlm.evaluation.speed import measure_speed

    out = {}
    hf = measure_speed([str(dense[0]), str(row[0])], "transformers", 64, 16, (1,), repeats, 2, progress=False)
    out["transformers_decode_tok_s"] = [m["decode_tok_s"]["1"] for m in hf["models"]]
    if row[1] is not None:
        cpp = measure_speed([str(dense[1]), str(row[1])], "llama.cpp", 64, 64, (1,), repeats, 2, progress=False)
        out["llama_cpp_tg_tok_s"] = [m["decode_tok_s"]["1"] for m in cpp["models"]]
    return out


def run_row(name, kind, settings, work: Path, dense, calib, data_dir, eval_windows, repeats) -> dict:
    import slimlm
    from slimlm.structured.shrink import parameter_counts
    from slimlm.gguf.quantize import to_gguf

    model, tok = slimlm.load_model("smollm2-135m")
    before = parameter_counts(model)
    start = time.perf_counter()
    manifest = compress(kind, settings, model, tok, calib)
    seconds = time.perf_counter() - start
    ppl = slimlm.evaluate(model, tok, "wikitext2", 2048, eval_windows, data_dir, progress=False)["perplexity"]
    after = parameter_counts(model)
    folder = work / name.split()[0]
    slimlm.save(model, tok, folder, slimlm.Result(manifest))
    gguf = None
    if kind == "shrink" and settings.get("method") != "slicegpt":
        gguf = to_gguf(model, tok, work / f"{folder.name}.f16.gguf", "F16", method="rtn", progress=False)
    record = {"row": name, "settings": settings, "perplexity": ppl, "seconds": seconds,
              "decoder_params_ratio": after["decoder_linears"] / before["decoder_linears"],
              "params_ratio": after["total"] / before["total"],
              "removed_layers": manifest.get("removed_layers"), "widths": manifest.get("widths")}
    record["file_ratio"] = folder_bytes(folder) / folder_bytes(dense[0])
    return record | speeds(dense, (folder, gguf), repeats)


def quantized_pair(best: dict, work: Path, data_dir: str, repeats: int) -> dict:
    """The best depth row and the dense model as Q4_K_M: llama-perplexity and llama-bench tg side by side."""
    import slimlm
    from slimlm.evaluation.llama_cpp import llama_perplexity
    from slimlm.evaluation.speed import measure_speed
    from slimlm.gguf.quantize import to_gguf

    files = {}
    for label, source in (("dense", "smollm2-135m"), (best["row"], str(work / best["row"].split()[0]))):
        model, tok = slimlm.load_model(source)
        files[label] = to_gguf(model, tok, work / f"{label.split()[0]}.q4km.gguf", "Q4_K_M", method="gptq",
                               data_dir=data_dir, progress=False)
    text = Path(data_dir) / "wikitext2" / "test.raw"
    ppl = {label: llama_perplexity(path, text, 512, 100)["perplexity"] for label, path in files.items()}
    speed = measure_speed([str(files["dense"]), str(files[best["row"]])], "llama.cpp", 64, 64, (1,), repeats, 2,
                          progress=False)
    tg = [m["decode_tok_s"]["1"] for m in speed["models"]]
    return {"row": best["row"], "ppl_dense_q4km": ppl["dense"], "ppl_row_q4km": ppl[best["row"]],
            "tg_dense_q4km": tg[0], "tg_row_q4km": tg[1], "tg_ratio": tg[1] / tg[0],
            "bytes_dense": files["dense"].stat().st_size, "bytes_row": files[best["row"]].stat().st_size}


def _ratio(pair) -> str:
    """A row's speed over dense's, both measured in the same call."""
    return f"{pair[1] / pair[0]:.2f}x" if pair else "n/a"


def write(results: dict, out: Path) -> None:
    out.write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"dense perplexity {results['dense_perplexity']:.3f} ({results['eval_windows']} windows x 2048)", "",
             "| cut | row | ppl | decoder params | file | transformers decode | llama.cpp tg | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['cut']} | {r['row']} | failed: {r['error'][:80]} | | | | | |")
            continue
        file = f"{r['file_ratio']:.3f}" if "file_ratio" in r else "n/a"
        lines.append(f"| {r['cut']} | {r['row']} | {r['perplexity']:.3f} | {r['decoder_params_ratio']:.3f} | {file} | "
                     f"{_ratio(r.get('transformers_decode_tok_s'))} | {_ratio(r.get('llama_cpp_tg_tok_s'))} | "
                     f"{r['seconds']:.0f} |")
    if "q4km" in results:
        q = results["q4km"]
        lines += ["", f"Q4_K_M (GPTQ): dense ppl {q['ppl_dense_q4km']:.3f}, {q['row']} ppl {q['ppl_row_q4km']:.3f}; "
                  f"tg {q['tg_dense_q4km']:.1f} vs {q['tg_row_q4km']:.1f} tok/s ({q['tg_ratio']:.2f}x); "
                  f"{q['bytes_dense'] / 1e6:.1f} vs {q['bytes_row'] / 1e6:.1f} MB"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=DEFAULT_DATA)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--cuts", default="0.2,0.35")
    parser.add_argument("--rows", help="comma-separated row names (default: all)")
    parser.add_argument("--repeats", type=int, default=2, help="speed rounds per row, models alternating")
    parser.add_argument("--out", default=str(RESULTS / "structured_table.json"))
    args = parser.parse_args()
    import slimlm
    from slimlm.structured.shrink import shrink
    from slimlm.gguf.quantize import to_gguf

    work = Path(tempfile.mkdtemp(prefix="structured-"))
    model, tok = slimlm.load_model("smollm2-135m")
    calib, _ = protocol_windows(tok, args.data_dir, 32, 1)
    dense_ppl = slimlm.evaluate(model, tok, "wikitext2", 2048, args.eval_windows, args.data_dir,
                                progress=False)["perplexity"]
    model.save_pretrained(work / "dense")
    tok.save_pretrained(work / "dense")
    dense = (work / "dense", to_gguf(model, tok, work / "dense.f16.gguf", "F16", method="rtn", progress=False))
    results = {"eval_windows": args.eval_windows, "dense_perplexity": dense_ppl, "rows": []}
    out = Path(args.out)
    for cut in (float(c) for c in args.cuts.split(",")):
        for name, (kind, settings) in rows(cut).items():
            if args.rows and name.split()[0] not in args.rows.split(","):
                continue
            print(f"{cut} {name}", flush=True)
            try:
                record = run_row(name, kind, settings, work, dense, calib, args.data_dir, args.eval_windows,
                                 args.repeats)
            except Exception as e:  # a failed row is recorded, the others still run
                record = {"row": name, "error": f"{type(e).__name__}: {e}"}
            results["rows"].append({"cut": cut, **record})
            write(results, out)
            for path in work.glob(f"{name.split()[0]}*"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    depth_rows = [r for r in results["rows"] if r.get("removed_layers") and r["cut"] == 0.2]
    if depth_rows:
        best = min(depth_rows, key=lambda r: r["perplexity"])
        model, tok = slimlm.load_model("smollm2-135m")
        result = shrink(model, tok, calib=calib[:8], progress=False, **best["settings"])
        slimlm.save(model, tok, work / best["row"].split()[0], result)
        results["q4km"] = quantized_pair(best, work, args.data_dir, args.repeats)
        write(results, out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
