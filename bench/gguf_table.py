"""GGUF files of the built-in model by llama.cpp's quantizer and by slimlm, measured by llama.cpp's own tools
(issue #13).

Protocol: calibration = the first 32×512 tokens of wikitext2/valid.tokens (slimlm: ``--calib-sampling first
--nsamples 32 --seqlen 512``; llama-imatrix: the same tokens decoded back to text, ``-c 512 --chunks 32``).
Evaluation: llama-perplexity on test.raw (its bytes as they are), ``-c 512``, the first ``--chunks`` chunks, with
the mean KL divergence from the F16 file's logits; llama-bench pp512 and tg128 on 2 threads. Rows per size:
llama-quantize without and with the imatrix, slimlm RTN (our scale search weighted by our imatrix), slimlm GPTQ
(onto the same per-tensor types), and slimlm's own mix at the size of llama-quantize's file (``--size`` in tensor
bytes, GPTQ). Seconds to make a file: llama-imatrix (once, added to every imatrix row) + llama-quantize, against
one ``slimlm gguf`` process; every row runs in this one invocation.

    bash scripts/build_llama_cpp.sh && python bench/gguf_table.py [--sizes Q4_K_M,Q3_K_M] [--chunks 100]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DEFAULT_DATA, RESULTS

SIZES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]
SLIMLM = [sys.executable, "-m", "slimlm"]
CALIB = ["--calib-sampling", "first", "--nsamples", "32", "--seqlen", "512"]


class RowFailed(Exception):
    pass


def timed(argv: list) -> float:
    start = time.perf_counter()
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if done.returncode:
        raise RowFailed(f"failed: {' '.join(map(str, argv))}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def tensor_bytes(path: Path) -> int:
    return sum(int(t.n_bytes) for t in _tensors(path))


def _tensors(path: Path):
    import gguf

    return gguf.GGUFReader(path).tensors


def speed(path: Path) -> dict:
    """llama-bench tokens per second: prompt processing of 512 tokens, generation of 128, 2 threads."""
    done = subprocess.run([str(_tool("llama-bench")), "-m", str(path), "-p", "512", "-n", "128", "-t", "2",
                           "-o", "json"], capture_output=True, text=True, check=True)
    return {("pp512" if r["n_prompt"] else "tg128"): r["avg_ts"] for r in json.loads(done.stdout)}


def measure(path: Path, text: Path, base: Path, chunks: int, bench: bool) -> dict:
    from slimlm.evaluation.llama_cpp import llama_perplexity

    result = llama_perplexity(path, text, 512, chunks, 2, base)
    tensors = _tensors(path)
    row = {"file_bytes": path.stat().st_size, "tensor_bytes": sum(int(t.n_bytes) for t in tensors),
           "ppl": result["perplexity"], "kld": result["kld"]}
    row["bpw"] = 8 * row["tensor_bytes"] / sum(int(t.n_elements) for t in tensors)
    return row | (speed(path) if bench else {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="any model slimlm loads (alias, folder, .gguf)")
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--data-dir", default=DEFAULT_DATA)
    parser.add_argument("--no-bench", action="store_true", help="skip llama-bench")
    parser.add_argument("--out", default=str(RESULTS / "gguf_table.json"), help="JSON, rewritten after every row")
    parser.add_argument("--speed-pass", metavar="WORK", help="only rerun llama-bench on the files a run left in its "
                        "WORK folder (printed first) and time llama-imatrix again, rewriting --out's pp512/tg128 "
                        "and imatrix seconds: for a run that shared the machine, once it is quiet")
    args = parser.parse_args()
    if args.speed_pass:
        return speed_pass(Path(args.speed_pass), Path(args.out))
    from slimlm.core.data import load_text, tokenize
    from slimlm.core.models import load_model
    from slimlm.errors import SlimlmError
    from slimlm.evaluation.llama_cpp import llama_perplexity

    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    print(json.dumps({"work": str(work)}), flush=True)
    text = Path(args.data_dir) / "wikitext2" / "test.raw"
    _, tok = load_model(args.model)
    calib_text = work / "calib.txt"
    calib_text.write_text(tok.decode(tokenize(load_text("wikitext2", "calib", args.data_dir), tok)[: 32 * 512]))
    f16, base = file_for(work, "F16"), work / "f16.kld"
    timed([*SLIMLM, "gguf", args.model, "--type", "F16", "--method", "rtn", "--out", f16, "--quiet"])
    llama_perplexity(f16, text, 512, args.chunks, 2, base, save_base=True)
    imatrix = work / "imatrix.gguf"
    imatrix_s = timed([_tool("llama-imatrix"), "-m", f16, "-f", calib_text, "-c", 512, "--chunks", 32, "-t", 2,
                       "-o", imatrix])
    table = {"protocol": {"model": args.model, "chunks": args.chunks, "ctx": 512, "threads": 2,
                          "imatrix_seconds": imatrix_s}, "rows": {}}

    def row(name: str, argv: list | None, extra_seconds: float = 0.0) -> None:
        """Make the row's file with ``argv`` (timed), measure it, and rewrite the JSON and table so far; a failed
        row is recorded with its error and the others go on."""
        out = file_for(work, name)
        try:
            seconds = {} if argv is None else {"seconds": timed(argv) + extra_seconds}
            table["rows"][name] = seconds | measure(out, text, base, args.chunks, not args.no_bench)
        except (RowFailed, SlimlmError, subprocess.CalledProcessError) as error:
            table["rows"][name] = {"error": str(error)[-2000:]}
        print(json.dumps({name: table["rows"][name]}), flush=True)
        write(table, Path(args.out))

    row("F16", None)
    for size in args.sizes.split(","):
        lq = file_for(work, f"{size} llama-quantize")
        row(f"{size} llama-quantize", [_tool("llama-quantize"), f16, lq, size, 2])
        row(f"{size} llama-quantize + imatrix", [_tool("llama-quantize"), "--imatrix", imatrix, f16,
                                                 file_for(work, f"{size} llama-quantize + imatrix"), size, 2],
            imatrix_s)
        ours = [*SLIMLM, "gguf", args.model, "--type", size, *CALIB, "--data-dir", args.data_dir, "--quiet"]
        row(f"{size} slimlm rtn", [*ours, "--method", "rtn", "--imatrix", "--out",
                                   file_for(work, f"{size} slimlm rtn")])
        row(f"{size} slimlm gptq", [*ours, "--method", "gptq", "--out", file_for(work, f"{size} slimlm gptq")])
        if lq.exists():
            row(f"{size} slimlm fisher mix", [*ours, "--method", "gptq", "--size", tensor_bytes(lq), "--out",
                                              file_for(work, f"{size} slimlm fisher mix")])


FILES = {"llama-quantize": "lq", "llama-quantize + imatrix": "lqi", "slimlm rtn": "rtn", "slimlm gptq": "gptq",
         "slimlm fisher mix": "mix"}


def file_for(work: Path, name: str) -> Path:
    """The file of a row ('F16', 'Q4_K_M slimlm gptq', ...) in a run's work folder."""
    if name == "F16":
        return work / "f16.gguf"
    size, kind = name.split(" ", 1)
    return work / f"{FILES[kind]}-{size}.gguf"


def write(table: dict, out: Path) -> None:
    out.write_text(json.dumps(table, indent=1))
    out.with_suffix(".md").write_text(markdown(table["rows"]))


def speed_pass(work: Path, out: Path) -> None:
    """llama-bench again on every measured row's file, and llama-imatrix timed again (its time is part of every
    imatrix row's), one after the other: on a quiet machine, the only load. The table records the pass."""
    table = json.loads(out.read_text())
    for name, row in table["rows"].items():
        if "error" not in row and file_for(work, name).is_file():
            row |= speed(file_for(work, name))
            print(json.dumps({name: {k: row[k] for k in ("pp512", "tg128")}}), flush=True)
    first = table["protocol"]["imatrix_seconds"]
    again = timed([_tool("llama-imatrix"), "-m", file_for(work, "F16"), "-f", work / "calib.txt", "-c", 512,
                   "--chunks", 32, "-t", 2, "-o", work / "imatrix-again.gguf"])
    for name, row in table["rows"].items():
        if name.endswith("+ imatrix") and "seconds" in row:
            row["seconds"] += again - first
    table["protocol"] |= {"imatrix_seconds": again, "imatrix_seconds_first": first,
                          "speeds": "a separate llama-bench pass over the files (--speed-pass)"}
    write(table, out)


def markdown(rows: dict) -> str:
    """The README table: one line per file; time as a multiple of llama-imatrix + llama-quantize's."""
    lines = ["| file | MB | bpw | ppl | KLD | pp512 t/s | tg128 t/s | seconds (× llama-imatrix + quantize) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'].splitlines()[-1][:120]} |||||||")
            continue
        size = name.split()[0]
        base = rows.get(f"{size} llama-quantize + imatrix", {}).get("seconds")
        seconds = f"{row['seconds']:.1f}" + (f" ({row['seconds'] / base:.2f}×)" if base and "seconds" in row else "") \
            if "seconds" in row else "–"
        speeds = [f"{row[k]:.1f}" if k in row else "–" for k in ("pp512", "tg128")]
        lines.append(f"| {name} | {row['file_bytes'] / 1e6:.1f} | {row['bpw']:.3f} | {row['ppl']:.4f} | "
                     f"{abs(row['kld']):.5f} | {' | '.join(speeds)} | {seconds} |")
    return "\n".join(lines) + "\n"


def _tool(name: str) -> Path:
    from slimlm.evaluation.llama_cpp import tool

    return tool(name)


if __name__ == "__main__":
    main()
