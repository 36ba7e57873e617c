"""The Python API: ``prune``, ``evaluate`` and ``save`` over a loaded model; the CLI calls these."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from slimlm import data as data_mod
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


def prune(model, tokenizer=None, method: str = "wanda", sparsity: float = 0.5, pattern: str | None = None,
          group: str | None = None, permute: bool = False, budgets: dict[str, float] | None = None,
          calib: torch.Tensor | None = None, calib_source: str = "wikitext2", nsamples: int = 128,
          seqlen: int = 2048, sampling: str = "random", seed: int = 0, data_dir: str | None = None,
          device: str = "cpu", batch_size: int | None = None, ria_alpha: float = 0.5,
          blocksize: int = 128, damp: float = 0.01, progress: bool = True) -> Result:
    """Prune every linear inside the decoder blocks of ``model`` in place.

    ``sparsity`` is the per-layer target unless ``budgets`` (FQN -> sparsity) says otherwise;
    ``pattern`` 'N:M' overrides both. ``calib`` (token windows ``(n, seqlen)``) skips loading data.
    Returns a ``Result`` whose manifest records per-layer achieved sparsity, settings and timings.
    """
    m = get_method(method)
    spec = PruneSpec(nm=parse_pattern(pattern), group=group, permute=permute, ria_alpha=ria_alpha,
                     blocksize=blocksize, damp=damp)
    layers = linear_fqns(model)
    budgets = {fqn: check_sparsity(sparsity) for fqn in layers} | (budgets or {})
    unknown = set(budgets) - set(layers)
    if unknown:
        raise SlimlmError(f"budgets name layers the model does not have: {sorted(unknown)[:3]}")
    for value in budgets.values():
        check_sparsity(value)
    torch.manual_seed(seed)
    achieved, perms = {}, {}

    def compress(fqn, linear, stats):
        W = linear.weight.data
        new, mask, perm = m.fn(W, stats, budgets[fqn], spec)
        linear.weight.data.copy_(new)
        achieved[fqn] = {"target": budgets[fqn] if spec.nm is None else 1 - spec.nm[0] / spec.nm[1],
                         "sparsity": (new == 0).float().mean().item()}
        if perm is not None:
            perms[fqn] = perm.cpu()
        return True

    start = time.perf_counter()
    calib_info = None
    if m.needs_data:
        t = time.perf_counter()
        if calib is None:
            calib = calibration(tokenizer, calib_source, nsamples, seqlen, sampling, seed, data_dir)
        check_tokens(model, calib)
        data_s = time.perf_counter() - t
        timings = compress_blocks(model, calib, compress, set(budgets), hessian=m.needs_hessian,
                                  device=device, batch_size=batch_size, progress=progress)
        timings["data"] = data_s
        calib_info = {"source": calib_source, "nsamples": calib.shape[0], "seqlen": calib.shape[1],
                      "sampling": sampling, "seed": seed, "tokens": calib.numel(),
                      "bos_added": _adds_bos(tokenizer)}
    else:
        t = time.perf_counter()
        for fqn, linear in layers.items():
            compress(fqn, linear, None)
        timings = {"compress": time.perf_counter() - t}
    timings["total"] = time.perf_counter() - start
    total = sum(layers[f].weight.numel() for f in achieved)
    zeros = sum(achieved[f]["sparsity"] * layers[f].weight.numel() for f in achieved)
    manifest = {
        "kind": "prune", "method": method, "pattern": pattern or "unstructured",
        "group": group or m.default_group, "permute": permute, "sparsity_target": sparsity,
        "sparsity": zeros / total, "options": {"ria_alpha": ria_alpha, "blocksize": blocksize, "damp": damp},
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
