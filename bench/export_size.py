"""Bytes on disk of every export format, on the built-in SmolLM2-135M (quality is not measured here).

Makes a few runs with tiny calibration (2 windows of 64 tokens of wikitext2/valid.tokens), exports each in
every format that applies, and measures: bytes on disk (the whole output: weights, config, tokenizer), bytes of
the block linears' storage in that format (from the safetensors header or the GGUF tensor table) per linear
parameter, and the whole output per model parameter, against the dense float32 and bfloat16 sizes.

    python bench/export_size.py                       # -> bench/results/export_size.json and .md
    python bench/export_size.py --runs dense,rtn-w4-g32-asym --keep /tmp/exports
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import tempfile
import time
from pathlib import Path

from common import DEFAULT_DATA, RESULTS

F16 = "float16"
RUNS = {  # name -> (slimlm function, its keyword arguments)
    "dense": ("prune", dict(method="magnitude", sparsity=0.0)),
    "wanda-50": ("prune", dict(method="wanda", sparsity=0.5)),
    "wanda-2:4": ("prune", dict(method="wanda", pattern="2:4")),
    "gptq-w4-g128": ("quantize", dict(method="gptq", wbits=4, group_size=128, scale_dtype=F16)),
    "rtn-w4-g32-asym": ("quantize", dict(method="rtn", wbits=4, group_size=32, symmetric=False, scale_dtype=F16)),
    "wanda-2:4+w4-g32": ("prune", dict(method="wanda", pattern="2:4", wbits=4, group_size=32, scale_dtype=F16)),
}


def make_run(name: str, folder: Path, data_dir: str) -> Path:
    import slimlm

    kind, kwargs = RUNS[name]
    model, tokenizer = slimlm.load_model("smollm2-135m")
    calib = slimlm.calibration(tokenizer, "wikitext2", 2, 64, "first", 0, data_dir)
    result = getattr(slimlm, kind)(model, tokenizer, calib=calib, progress=False, **kwargs)
    result.manifest["model"] = "smollm2-135m"  # as `slimlm prune/quantize` records it
    return slimlm.save(model, tokenizer, folder, result)


def formats_for(run: Path) -> list[str]:
    manifest = json.loads((run / "slimlm.json").read_text())
    quantized = manifest["kind"] == "quantize" or bool(manifest.get("quantization"))
    pruned = manifest.get("sparsity_target", 0) > 0 or manifest.get("pattern", "unstructured") != "unstructured"
    sparse = manifest["kind"] == "prune" and pruned
    return ["run"] + ["sparse"] * sparse + ["compressed-tensors"] * quantized + ["gguf"] + ["gguf-f16"] * (
        not quantized and not sparse)


def export(run: Path, fmt: str, out: Path) -> Path:
    from slimlm.formats.compressed_tensors import export_compressed_tensors
    from slimlm.formats.sparse import export_sparse
    from slimlm.gguf.export import export_gguf

    if fmt == "run":
        return run
    if fmt == "sparse":
        return export_sparse(run, out)
    if fmt == "compressed-tensors":
        return export_compressed_tensors(run, out)
    return export_gguf(run, out.parent / f"{out.name}.gguf", "f16" if fmt == "gguf-f16" else "auto")


def safetensors_bytes(path: Path) -> dict[str, int]:
    """Tensor name -> bytes, from the safetensors header (8-byte length, then JSON with data_offsets)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def linear_bytes(output: Path, fqns: list[str]) -> int:
    """Bytes of the block linears' weights in this output: every tensor named after a linear (<fqn>.weight*),
    or for GGUF every 2-D tensor of a block (blk.N.*)."""
    if output.suffix == ".gguf":
        import gguf
        return sum(int(t.n_bytes) for t in gguf.GGUFReader(output).tensors
                   if t.name.startswith("blk.") and len(t.shape) == 2)
    sizes = safetensors_bytes(output / "model.safetensors")
    return sum(n for k, n in sizes.items() if k.rsplit(".weight", 1)[0] in fqns)


def disk_bytes(output: Path) -> int:
    return output.stat().st_size if output.is_file() else sum(f.stat().st_size for f in output.rglob("*")
                                                              if f.is_file())


def measure(name: str, run: Path, fmt: str, out: Path) -> dict:
    from slimlm.errors import SlimlmError

    manifest = json.loads((run / "slimlm.json").read_text())
    fqns = list(manifest["layers"])
    sizes = safetensors_bytes(run / "model.safetensors")  # float32 run: 4 bytes per parameter
    params, linear_params = sum(sizes.values()) // 4, sum(sizes[f"{f}.weight"] for f in fqns) // 4
    row = {"run": name, "format": fmt, "params": params, "linear_params": linear_params}
    start = time.perf_counter()
    try:
        output = export(run, fmt, out)
    except SlimlmError as e:
        return row | {"error": str(e)}
    row["export_seconds"] = time.perf_counter() - start
    total, linears = disk_bytes(output), linear_bytes(output, fqns)
    return row | {"bytes": total, "bytes_per_param": total / params, "vs_fp32": total / (4 * params),
                  "vs_bf16": total / (2 * params), "linear_bytes": linears,
                  "linear_bytes_per_param": linears / linear_params}


def markdown(rows: list[dict]) -> str:
    params = rows[0]["params"]
    lines = [f"Dense references: float32 {4 * params / 1e6:.1f} MB, bfloat16 {2 * params / 1e6:.1f} MB "
             f"({params:,} parameters, {rows[0]['linear_params']:,} in the block linears).", "",
             "| run | format | MB on disk | B/param (whole) | x fp32 | x bf16 | linear B/param |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | {r['format']} | refused: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['run']} | {r['format']} | {r['bytes'] / 1e6:.1f} | {r['bytes_per_param']:.3f} | "
                     f"{r['vs_fp32']:.3f} | {r['vs_bf16']:.3f} | {r['linear_bytes_per_param']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--data-dir", default=DEFAULT_DATA)
    parser.add_argument("--keep", help="keep runs and exports in this (new) folder; default: a temporary one")
    parser.add_argument("--out", default=str(RESULTS / "export_size.json"))
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="export_size-"))
    root.mkdir(parents=True, exist_ok=bool(not args.keep))
    rows = []
    try:
        for name in args.runs.split(","):
            slug = name.replace(":", "of").replace("+", "_")
            run = make_run(name, root / slug, args.data_dir)
            for fmt in formats_for(run):
                rows.append(measure(name, run, fmt, root / f"{slug}.{fmt}"))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"protocol": __doc__.split("\n\n")[1], "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
