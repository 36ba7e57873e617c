"""``slimlm`` command line: a thin layer over the Python API. Every run writes a manifest."""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from slimlm.errors import SlimlmError


def _add_model_args(p):
    p.add_argument("model", help="built-in alias (smollm2-135m), HF folder, .gguf file, or hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="compute device (cpu, cuda, cuda:1); the model "
                   "stays on the CPU and each block visits the device in turn")
    p.add_argument("--data-dir", help="offline data folder (wikitext2/test.raw, wikitext2/valid.tokens); "
                   "default: $SLIMLM_DATA_DIR, else the datasets library")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled (.bin) weights")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_eval_args(p):
    p.add_argument("--eval-dataset", default="wikitext2", help="wikitext2, c4, or a text file")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, help="limit to the first N windows")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model block by block on calibration data")
    _add_model_args(p)
    p.add_argument("--method", default="wanda", help="magnitude, wanda, sparsegpt, ria")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of zeros per layer, in [0, 1)")
    p.add_argument("--pattern", default="unstructured", help="unstructured or N:M (keep N of every M)")
    p.add_argument("--group", choices=["row", "matrix"], help="comparison group (default: the paper's)")
    p.add_argument("--permute", action="store_true", help="channel permutation before N:M (RIA)")
    p.add_argument("--ria-alpha", type=float, default=0.5, help="RIA activation exponent")
    p.add_argument("--calib", default="wikitext2", help="wikitext2, c4, or a text file")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--calib-sampling", default="random", choices=["random", "first"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="calibration windows per forward (default 8192 tokens)")
    p.add_argument("--out", help="output folder (default runs/<model>-<method>-<budget>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--eval", action="store_true", help="measure test perplexity after pruning")
    _add_eval_args(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="perplexity of a saved run or any model")
    _add_model_args(p)
    _add_eval_args(p)
    p.set_defaults(func=cmd_eval)
    return parser


def _default_out(args) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(args.model).stem if args.model.endswith(".gguf")
                  else Path(args.model).name or args.model)
    budget = args.pattern.replace(":", "of") if args.pattern != "unstructured" else f"{args.sparsity:g}"
    return Path("runs") / f"{name}-{args.method}-{budget}"


def _eval(model, tokenizer, args) -> dict:
    import slimlm
    return slimlm.evaluate(model, tokenizer, args.eval_dataset, args.eval_seqlen, args.eval_windows,
                           args.data_dir, args.device, progress=not args.quiet)


def cmd_prune(args) -> None:
    import slimlm
    from slimlm.data import check_source, data_dir
    from slimlm.export import check_output
    from slimlm.prune import check_sparsity, get_method, parse_pattern

    get_method(args.method), parse_pattern(args.pattern), check_sparsity(args.sparsity)  # fail fast
    check_source(args.calib), check_source(args.eval_dataset), data_dir(args.data_dir)
    out = check_output(args.out or _default_out(args), args.overwrite)
    model, tokenizer = slimlm.load_model(args.model, args.dtype, args.allow_pickle)
    result = slimlm.prune(
        model, tokenizer, method=args.method, sparsity=args.sparsity, pattern=args.pattern,
        group=args.group, permute=args.permute, calib_source=args.calib, nsamples=args.nsamples,
        seqlen=args.seqlen, sampling=args.calib_sampling, seed=args.seed, data_dir=args.data_dir,
        device=args.device, batch_size=args.batch_size, ria_alpha=args.ria_alpha,
        progress=not args.quiet)
    result.manifest["model"] = args.model
    result.manifest["dtype"] = args.dtype
    if args.eval:
        result.manifest["metrics"] = {"perplexity": _eval(model, tokenizer, args)}
    slimlm.save(model.to("cpu"), tokenizer, out, result, args.overwrite)
    summary = {k: result.manifest.get(k) for k in ("method", "pattern", "sparsity")}
    summary["seconds"] = round(result.manifest["timings"]["total"], 2)
    if args.eval:
        summary["perplexity"] = result.manifest["metrics"]["perplexity"]["perplexity"]
    print(json.dumps({"out": str(out), **summary}))


def cmd_eval(args) -> None:
    import slimlm
    from slimlm.export import MANIFEST, read_manifest, write_manifest

    model, tokenizer = slimlm.load_model(args.model, args.dtype, args.allow_pickle)
    metrics = _eval(model, tokenizer, args)
    folder = Path(args.model)
    if (folder / MANIFEST).is_file():  # a slimlm run: record the result in its manifest
        manifest = read_manifest(folder)
        manifest.setdefault("metrics", {})["perplexity"] = metrics
        write_manifest(folder, manifest)
    print(json.dumps({"model": args.model, **metrics}))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    try:
        args.func(args)
    except SlimlmError as e:
        print(f"slimlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimlm: interrupted; no output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
