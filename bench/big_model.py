"""Peak memory and wall-clock of ``slimlm prune --offload disk`` on a model larger than RAM.

    python bench/big_model.py --big /work/big/llama-30g --out /work/big/out --cleanup

Rows, each one ``slimlm prune ... --method wanda --pattern 2:4 --nsamples 2 --seqlen 256`` in its own process
(peak RSS = that process's ru_maxrss, from wait4; wall-clock includes start-up, loading and saving):
  * the synthetic random-weight Llama written by bench/synthetic_llama.py (~30.75 GB float32; generated
    first if missing), with --offload disk;
  * the built-in SmolLM2-135M float32 folder, in memory and with --offload disk.
Calibration is deliberately tiny (2 windows of 256 WikiText-2 tokens): the point is memory and I/O, not
quality. The big output is checked (every tensor present with its shape, 2:4 in a sampled block), then
removed with --cleanup, as is the input.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DEFAULT_DATA, RESULTS

PRUNE = ["--method", "wanda", "--pattern", "2:4", "--nsamples", "2", "--seqlen", "256", "--quiet"]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())


def run_prune(model: Path, out: Path, data_dir: str, offload: bool) -> dict:
    """One prune in a fresh process: its peak RSS (wait4 rusage) and wall-clock."""
    cmd = [sys.executable, "-m", "slimlm.cli", "prune", str(model), *PRUNE, "--data-dir", data_dir,
           "--out", str(out), *(["--offload", "disk"] if offload else [])]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout:  # a file, not a pipe: nothing can block the child
        child = subprocess.Popen(cmd, stdout=stdout, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        stdout.seek(0)
        summary = stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}")
    manifest = json.loads((out / "slimlm.json").read_text())
    size = folder_bytes(model)
    return {"model": str(model), "offload": offload, "command": " ".join(cmd[2:]),
            "size_on_disk_bytes": size, "peak_rss_bytes": usage.ru_maxrss * 1024, "rss_over_size":
            usage.ru_maxrss * 1024 / size, "wall_s": wall, "prune_s": manifest["timings"]["total"],
            "timings": manifest["timings"], "sparsity": manifest["sparsity"],
            "output_bytes": folder_bytes(out), "summary": json.loads(summary.strip().splitlines()[-1])}


def check_big_output(source: Path, out: Path) -> dict:
    """Every tensor the config implies is in the output shards with its shape; a sampled block is 2:4."""
    from safetensors import safe_open

    from slimlm.core.shards import check_shapes, skeleton, tensor_index

    index = tensor_index(out)
    check_shapes(skeleton(source), index)
    name = "model.layers.17.mlp.down_proj.weight"
    with safe_open(index[name][0], "pt") as f:
        weight = f.get_tensor(name)
    nonzero_per_group = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
    return {"tensors": len(index), "sampled": name, "max_nonzero_per_4": int(nonzero_per_group.max())}


def write_results(rows: list[dict], checks: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps({"protocol": __doc__, "rows": rows, "checks": checks},
                                                    indent=2) + "\n")
    lines = ["| model | mode | size on disk GB | peak RSS GB | RSS / size | wall s | prune s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {Path(r['model']).name} | {'--offload disk' if r['offload'] else 'in memory'} | "
                     f"{r['size_on_disk_bytes'] / 1e9:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} | "
                     f"{r['rss_over_size']:.1%} | {r['wall_s']:.0f} | {r['prune_s']:.0f} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", default="/work/big/llama-30g", help="synthetic checkpoint (generated if missing)")
    parser.add_argument("--out", default="/work/big/out", help="output folder of the big run")
    parser.add_argument("--data-dir", default=DEFAULT_DATA)
    parser.add_argument("--skip-big", action="store_true", help="only the built-in model rows")
    parser.add_argument("--cleanup", action="store_true", help="delete the big input and output at the end")
    parser.add_argument("--results", default=str(RESULTS / "big_model"))
    args = parser.parse_args()

    from slimlm.core.cache import gguf_to_folder
    from slimlm.core.models import builtin_gguf

    rows, checks = [], {}
    builtin = gguf_to_folder(builtin_gguf("smollm2-135m"))
    with tempfile.TemporaryDirectory() as tmp:
        for offload in (False, True):
            rows.append(run_prune(builtin, Path(tmp) / f"builtin-{offload}", args.data_dir, offload))
            print(json.dumps(rows[-1]), flush=True)
    if not args.skip_big:
        big, out = Path(args.big), Path(args.out)
        if not big.exists():
            from synthetic_llama import write_checkpoint
            checks["synthetic"] = write_checkpoint(big)
        rows.append(run_prune(big, out, args.data_dir, offload=True))
        print(json.dumps(rows[-1]), flush=True)
        checks["big_output"] = check_big_output(big, out)
        if args.cleanup:
            shutil.rmtree(out), shutil.rmtree(big)
    write_results(rows, checks, Path(args.results))
    print(Path(args.results).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
