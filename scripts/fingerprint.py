"""Fingerprint a fixed set of slimlm runs, so that a refactor can show its outputs are bit-identical.

Runs each command below on the built-in model with tiny calibration slices (each in a fresh process, through
the `slimlm` command) and writes, per output, the SHA-256 of every tensor (safetensors and GGUF), of ``metrics.json`` and of
the manifest without its timings and versions. Run it before and after a change and compare the two files:

    python scripts/fingerprint.py --out /tmp/before.json          # on the old commit
    python scripts/fingerprint.py --out /tmp/after.json --compare /tmp/before.json

Hashes hold on one machine only: float rounding depends on the CPU and the thread count.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data")
CALIB = ["--nsamples", "4", "--seqlen", "128", "--quiet"]
EVAL = ["--eval", "--eval-windows", "1", "--eval-seqlen", "256"]
RUNS = {  # name -> slimlm arguments ({out} and {data} are filled in; {run:NAME} is another run's folder)
    "wanda-50": ["prune", "smollm2-135m", "--method", "wanda", "--sparsity", "0.5", *CALIB, *EVAL],
    "magnitude-50": ["prune", "smollm2-135m", "--method", "magnitude", "--sparsity", "0.5", "--quiet"],
    "sparsegpt-2:4": ["prune", "smollm2-135m", "--method", "sparsegpt", "--pattern", "2:4", *CALIB],
    "ria-2:4-perm": ["prune", "smollm2-135m", "--method", "ria", "--pattern", "2:4", "--permute", *CALIB],
    "sparsegpt-50-w4": ["prune", "smollm2-135m", "--method", "sparsegpt", "--sparsity", "0.5", "--wbits", "4",
                        "--group-size", "64", *CALIB],
    "wanda-60-alphapruning": ["prune", "smollm2-135m", "--method", "wanda", "--sparsity", "0.6",
                              "--allocation", "alphapruning", *CALIB],
    "wanda-60-owl": ["prune", "smollm2-135m", "--method", "wanda", "--sparsity", "0.6", "--allocation", "owl",
                     *CALIB],
    "wanda-60-fisher": ["prune", "smollm2-135m", "--method", "wanda", "--sparsity", "0.6", "--allocation",
                        "fisher", *CALIB],
    "gptq-w4g128": ["quantize", "smollm2-135m", "--method", "gptq", "--wbits", "4", *CALIB, *EVAL],
    "gptq-asym-actorder-g64": ["quantize", "smollm2-135m", "--method", "gptq", "--asym", "--act-order",
                               "--group-size", "64", *CALIB],
    "gptq-one-pass": ["quantize", "smollm2-135m", "--method", "gptq", "--one-pass", "--wbits", "3", *CALIB],
    "rtn-w4a4-hadamard": ["quantize", "smollm2-135m", "--method", "rtn", "--abits", "4", "--rotate", "hadamard",
                          *CALIB, *EVAL],
    "gptq-mixed-alphapruning": ["quantize", "smollm2-135m", "--method", "gptq", "--avg-bits", "3.5",
                                "--allocation", "alphapruning", *CALIB],
    "rtn-q4_0": ["quantize", "smollm2-135m", "--method", "rtn", "--group-size", "32", "--scale-dtype", "float16",
                 "--quiet"],
    "offload-wanda": ["prune", "{builtin}", "--method", "wanda", "--sparsity", "0.5", "--offload", "disk", *CALIB],
    "analyze": ["analyze", "smollm2-135m", *CALIB],
    "export-gguf": ["export", "{run:rtn-q4_0}", "--format", "gguf"],
    "export-ct": ["export", "{run:gptq-asym-actorder-g64}", "--format", "compressed-tensors"],
    "export-sparse-nm": ["export", "{run:sparsegpt-2:4}", "--format", "sparse"],
    "export-sparse": ["export", "{run:wanda-50}", "--format", "sparse"],
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(path: Path) -> dict:
    """SHA-256 of every tensor and metrics file under ``path`` (a run folder, an export folder or a .gguf)."""
    import torch
    from safetensors.torch import load_file

    out = {}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        rel = f.name if path.is_file() else f.relative_to(path).as_posix()
        if f.suffix == ".safetensors":
            for key, t in sorted(load_file(f).items()):
                out[f"{rel}:{key}"] = sha(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        elif f.suffix == ".gguf":
            import gguf
            for t in gguf.GGUFReader(f).tensors:
                out[f"{rel}:{t.name}"] = sha(t.data.tobytes())
        elif f.name == "metrics.json":
            out[rel] = sha(f.read_bytes())
        elif f.name == "slimlm.json":
            manifest = json.loads(f.read_text())
            for key in ("timings", "versions"):
                manifest.pop(key, None)
            perplexity = (manifest.get("metrics") or {}).get("perplexity") or {}
            for key in ("tokens_per_s", "seconds"):
                perplexity.pop(key, None)
            out[rel] = sha(json.dumps(manifest, sort_keys=True).encode())
            if perplexity:
                out[f"{rel}:perplexity"] = perplexity["perplexity"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file of fingerprints")
    p.add_argument("--compare", help="an earlier fingerprint JSON: print what differs, exit 1 if anything")
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--data-dir", default=DATA)
    args = p.parse_args()
    from slimlm.core.cache import gguf_to_folder
    from slimlm.core.models import builtin_gguf

    work = Path(tempfile.mkdtemp(prefix="slimlm-fingerprint-"))
    folders, result = {}, {}
    try:
        for name in args.runs.split(","):
            out = work / name.replace(":", "of")
            folders[name] = out
            argv = [a.format(builtin=gguf_to_folder(builtin_gguf("smollm2-135m"))) if a == "{builtin}" else
                    str(folders[a[5:-1]]) if a.startswith("{run:") else a for a in RUNS[name]]
            if argv[0] == "export" and argv[-1] == "gguf":
                out = out.with_suffix(".gguf")
            argv += ["--out", str(out)] + (["--data-dir", args.data_dir] if argv[0] in ("prune", "quantize",
                                                                                         "analyze") else [])
            subprocess.run(["slimlm", *argv], check=True, stdout=subprocess.DEVNULL)
            result[name] = fingerprint(out)
            print(name, len(result[name]), "hashes", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        diffs = [(run, key) for run in before | result for key in before.get(run, {}) | result.get(run, {})
                 if before.get(run, {}).get(key) != result.get(run, {}).get(key)]
        for run, key in diffs[:40]:
            print(f"differs: {run} {key}: {before.get(run, {}).get(key)} -> {result.get(run, {}).get(key)}")
        print(f"{len(diffs)} differences over {sum(len(v) for v in result.values())} fingerprints")
        sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
