"""The benchmark protocol shared by the bench scripts (issue #2's, on the built-in model, float32, CPU).

Calibration: the whole text of wikitext2/valid.tokens tokenized as one string (tokenizer defaults),
first 32 non-overlapping windows of 512 tokens. Evaluation: the whole text of wikitext2/test.raw the
same way, first 32 non-overlapping windows of 2048 tokens.

Each row runs in its own subprocess (``run_rows``) so its peak RSS is its own; all rows of a script run in
one invocation, side by side, so their timings are comparable.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def protocol_windows(tokenizer, data_dir: str, calib_windows: int = 32, eval_windows: int = 32):
    from slimlm.core.data import calibration_windows, eval_windows as cut, load_text, tokenize

    calib = calibration_windows(tokenize(load_text("wikitext2", "calib", data_dir), tokenizer),
                                calib_windows, 512, "first")
    test = cut(tokenize(load_text("wikitext2", "test", data_dir), tokenizer), 2048, eval_windows)
    return calib, test


def compress_and_eval(kwargs: dict | None, data_dir: str, calib_windows: int, eval_windows: int,
                      kind: str = "prune") -> dict:
    """Load the built-in model, compress it with ``slimlm.<kind>(**kwargs)`` (None: dense), evaluate."""
    import torch

    import slimlm
    from slimlm.evaluation.perplexity import perplexity

    torch.manual_seed(0)
    model, tokenizer = slimlm.load_model("smollm2-135m")
    calib, test = protocol_windows(tokenizer, data_dir, calib_windows, eval_windows)
    row = {"model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
           "activation_bytes": calib.numel() * model.config.hidden_size * 4}
    if kwargs is not None:
        result = getattr(slimlm, kind)(model, tokenizer, calib=calib, progress=False, **kwargs)
        row.update(seconds=result.manifest["timings"]["total"], timings=result.manifest["timings"])
        for key in ("sparsity", "storage"):
            if key in result.manifest:
                row[key] = result.manifest[key]
    row["peak_rss_mb"] = peak_rss_mb()  # peak while loading + compressing, before evaluation
    ppl = perplexity(model, test, progress=False)
    row.update(perplexity=ppl.perplexity, eval_tokens_per_s=ppl.tokens_per_s, eval_windows=ppl.windows)
    return row


def run_rows(script: str, names: list[str], extra: list[str]) -> list[dict]:
    """Run ``script --row NAME`` for each name in a fresh process; each prints its row as the last line."""
    rows = []
    for name in names:
        out = subprocess.run([sys.executable, script, "--row", name, *extra], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write_json(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"protocol": __doc__.split("\n\n")[1], "rows": rows}, indent=2) + "\n")
    return path


def table_main(script: str, doc: str, rows: list[str], run_row, markdown, default_out: str) -> None:
    """The command line of a row-table benchmark: ``--rows`` runs each row in its own process
    (``run_row(name, args) -> dict`` there), then writes the JSON and ``markdown(rows)`` beside it."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--rows", default=",".join(rows))
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--out", default=default_out)
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = p.parse_args()
    if args.row:
        print(json.dumps({"row": args.row, **run_row(args.row, args)}))
        return
    done = run_rows(script, args.rows.split(","), ["--data-dir", args.data_dir, "--calib-windows",
                                                    str(args.calib_windows), "--eval-windows", str(args.eval_windows)])
    out = write_json(args.out, done)
    out.with_suffix(".md").write_text(markdown(done) + "\n")
    print(markdown(done))

