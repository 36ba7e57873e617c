"""The Python API: ``prune``, ``evaluate`` and ``save`` over a loaded model; the CLI calls these."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from slimlm import data as data_mod
from slimlm.allocate import ALLOCATOR_METRIC, allocate_from_metrics
from slimlm.analysis import ERROR_LEVELS, OWL_M, calibration_metrics, model_weight_metrics
from slimlm.engine import compress_blocks
from slimlm.errors import SlimlmError
from slimlm.evaluate import perplexity
from slimlm.export import save_run, versions
from slimlm.models import linear_fqns
from slimlm.prune import PruneSpec, check_sparsity, get_method, parse_pattern


@dataclass
class Result:
    """What a compression run produced: a JSON-able manifest and tensors to save beside the model."""

    manifest: dict
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def check_tokens(model, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids must index the model's embedding; a mismatched tokenizer is an error, not garbage."""
    vocab = model.get_input_embeddings().num_embeddings
    if tokens.numel() and int(tokens.max()) >= vocab:
        raise SlimlmError(f"token id {int(tokens.max())} is outside the model's vocabulary ({vocab}); "
                          "the tokenizer does not belong to this model")
    return tokens


def calibration(tokenizer, source: str = "wikitext2", nsamples: int = 128, seqlen: int = 2048,
                sampling: str = "random", seed: int = 0, data_dir: str | None = None) -> torch.Tensor:
    return data_mod.calibration_data(source, tokenizer, nsamples, seqlen, sampling, seed, data_dir)


def analyze(model, calib: torch.Tensor | None = None, owl_m: float = OWL_M, error_levels=ERROR_LEVELS,
            device: str = "cpu", batch_size: int | None = None, progress: bool = True) -> dict[str, dict]:
    """Per-linear metrics keyed by FQN: weight spectra always, activation metrics when ``calib`` is given."""
    metrics = model_weight_metrics(model)
    if calib is not None:
        check_tokens(model, calib)
        for fqn, record in calibration_metrics(model, calib, owl_m, error_levels, device, batch_size,
                                               progress).items():
            metrics[fqn].update(record)
    return metrics


def plan_budgets(model, allocation: str, target: float, calib: torch.Tensor | None = None,
                 owl_m: float = OWL_M, device: str = "cpu", batch_size: int | None = None,
                 progress: bool = True, **options) -> dict[str, float]:
    """Per-layer sparsity from an allocator, measuring only the metric it needs (one dense pass at most)."""
    metric = ALLOCATOR_METRIC.get(allocation)
    if metric == "alpha" or metric is None:
        metrics = model_weight_metrics(model) if metric else {f: {"size": l.weight.numel()}
                                                              for f, l in linear_fqns(model).items()}
    else:
        if calib is None:
            raise SlimlmError(f"allocation '{allocation}' needs calibration data")
        levels = ERROR_LEVELS if metric == "errors" else None
        metrics = calibration_metrics(model, calib, owl_m, levels, device, batch_size, progress)
        for fqn, lin in linear_fqns(model).items():
            metrics[fqn]["size"] = lin.weight.numel()
    return allocate_from_metrics(metrics, allocation, target, "sparsity", **options)


def prune(model, tokenizer=None, method: str = "wanda", sparsity: float = 0.5, pattern: str | None = None,
          group: str | None = None, permute: bool = False, budgets: dict[str, float] | None = None,
          allocation: str = "uniform", allocation_options: dict | None = None, owl_m: float = OWL_M,
          calib: torch.Tensor | None = None, calib_source: str = "wikitext2", nsamples: int = 128,
          seqlen: int = 2048, sampling: str = "random", seed: int = 0, data_dir: str | None = None,
          device: str = "cpu", batch_size: int | None = None, ria_alpha: float = 0.5,
          blocksize: int = 128, damp: float = 0.01, progress: bool = True) -> Result:
    """Prune every linear inside the decoder blocks of ``model`` in place.

    ``sparsity`` is the global target: every layer gets it with ``allocation='uniform'``; other allocators
    (owl, alphapruning, errortable) spread it non-uniformly with the same parameter-weighted mean.
    ``budgets`` (FQN -> sparsity) overrides the allocator; ``pattern`` 'N:M' overrides both.
    ``calib`` (token windows ``(n, seqlen)``) skips loading data.
    Returns a ``Result`` whose manifest records per-layer achieved sparsity, settings and timings.
    """
    m = get_method(method)
    spec = PruneSpec(nm=parse_pattern(pattern), group=group, permute=permute, ria_alpha=ria_alpha,
                     blocksize=blocksize, damp=damp)
    check_sparsity(sparsity)
    layers = linear_fqns(model)
    torch.manual_seed(seed)
    start = time.perf_counter()
    calib_info, timings = None, {}
    needs_calib = m.needs_data or ALLOCATOR_METRIC.get(allocation) in ("owl_lod", "errors")
    if needs_calib:
        t = time.perf_counter()
        if calib is None:
            calib = calibration(tokenizer, calib_source, nsamples, seqlen, sampling, seed, data_dir)
        check_tokens(model, calib)
        timings["data"] = time.perf_counter() - t
        calib_info = {"source": calib_source, "nsamples": calib.shape[0], "seqlen": calib.shape[1],
                      "sampling": sampling, "seed": seed, "tokens": calib.numel(),
                      "bos_added": _adds_bos(tokenizer)}
    if budgets is None and allocation != "uniform" and spec.nm is None:
        t = time.perf_counter()
        budgets = plan_budgets(model, allocation, sparsity, calib, owl_m, device, batch_size, progress,
                               **(allocation_options or {}))
        timings["allocation"] = time.perf_counter() - t
    budgets = {fqn: sparsity for fqn in layers} | (budgets or {})
    unknown = set(budgets) - set(layers)
    if unknown:
        raise SlimlmError(f"budgets name layers the model does not have: {sorted(unknown)[:3]}")
    for value in budgets.values():
        check_sparsity(value)
    achieved, perms = {}, {}

    def compress(fqn, linear, stats):
        new, mask, perm = m.fn(linear.weight.data, stats, budgets[fqn], spec)
        linear.weight.data.copy_(new)
        achieved[fqn] = {"target": budgets[fqn] if spec.nm is None else 1 - spec.nm[0] / spec.nm[1],
                         "sparsity": (new == 0).float().mean().item()}
        if perm is not None:
            perms[fqn] = perm.cpu()
        return True

    if m.needs_data:
        timings |= compress_blocks(model, calib, compress, set(budgets), hessian=m.needs_hessian,
                                   device=device, batch_size=batch_size, progress=progress)
    else:
        t = time.perf_counter()
        for fqn, linear in layers.items():
            compress(fqn, linear, None)
        timings["compress"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    total = sum(layers[f].weight.numel() for f in achieved)
    zeros = sum(achieved[f]["sparsity"] * layers[f].weight.numel() for f in achieved)
    manifest = {
        "kind": "prune", "method": method, "pattern": pattern or "unstructured",
        "group": group or m.default_group, "permute": permute, "sparsity_target": sparsity,
        "sparsity": zeros / total, "allocation": {"name": allocation, "owl_m": owl_m, **(allocation_options or {})},
        "options": {"ria_alpha": ria_alpha, "blocksize": blocksize, "damp": damp},
        "calibration": calib_info, "device": str(device), "seed": seed, "timings": timings,
        "versions": versions(), "layers": achieved,
    }
    return Result(manifest, {"nm_permutations.safetensors": perms} if perms else {})


def _adds_bos(tokenizer) -> bool | None:
    if tokenizer is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def evaluate(model, tokenizer, source: str = "wikitext2", seqlen: int = 2048, windows: int | None = None,
             data_dir: str | None = None, device: str = "cpu", batch_size: int = 1,
             progress: bool = True) -> dict:
    """WikiText-2 (or other) test perplexity with non-overlapping windows; returns a JSON-able dict."""
    tokens = data_mod.tokenize(data_mod.load_text(source, "test", data_dir), tokenizer)
    windows = check_tokens(model, data_mod.eval_windows(tokens, seqlen, windows))
    result = perplexity(model, windows, device, batch_size, progress)
    return {"dataset": source, "perplexity": result.perplexity, "nll": result.nll, "windows": result.windows,
            "seqlen": result.seqlen, "tokens_per_s": result.tokens_per_s, "seconds": result.seconds,
            "bos_added": _adds_bos(tokenizer)}


def save(model, tokenizer, out, result: Result, overwrite: bool = False):
    """Write ``out`` atomically: safetensors model, tokenizer, ``slimlm.json`` and extra tensors."""
    return save_run(model, tokenizer, out, result.manifest, overwrite, result.tensors)
