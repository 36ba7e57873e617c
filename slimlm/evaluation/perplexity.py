"""Perplexity with the literature's protocol (Wanda/SparseGPT/GPTQ evaluation code).

The test text is tokenized as one string and cut into non-overlapping windows of ``seqlen`` tokens;
each window is scored on its own (no context carried over), with the usual causal shift: logits at
positions 0..T-2 predict tokens 1..T-1. Perplexity = exp(mean negative log-likelihood over all
predicted tokens).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from slimlm.errors import SlimlmError

log = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float              # mean negative log-likelihood per predicted token (nats)
    windows: int
    seqlen: int
    tokens_per_s: float     # evaluation throughput (input tokens / wall-clock seconds)
    seconds: float


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 1,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` ``(n, seqlen)``; the model is moved to ``device``. With
    ``progress``, a bar and, after the first batch, a logged estimate of the whole evaluation's time."""
    model.to(device)
    n, seqlen = windows.shape
    total_nll, count = 0.0, 0
    start = time.perf_counter()
    with logging_redirect_tqdm() if progress else contextlib.nullcontext():  # log lines above the bar
        for s in tqdm(range(0, n, batch_size), desc="eval", disable=not progress):
            ids = windows[s:s + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
            total_nll += nll.item()
            count += ids[:, 1:].numel()
            if progress and s == 0 and n > batch_size:
                first = time.perf_counter() - start
                log.info("%d of %d windows in %.1f s: %s for all %d", len(ids), n, first,
                         about(first * math.ceil(n / batch_size)), n)
    seconds = time.perf_counter() - start
    mean_nll = total_nll / count
    if not math.isfinite(mean_nll):
        raise SlimlmError("non-finite loss during evaluation; the model produced NaN/inf logits")
    return PerplexityResult(math.exp(mean_nll), mean_nll, n, seqlen, n * seqlen / seconds, seconds)


def about(seconds: float) -> str:
    """A rough duration for people: ~40 s, ~12 min, ~2.5 h."""
    if seconds < 90:
        return f"~{seconds:.0f} s"
    return f"~{seconds / 60:.0f} min" if seconds < 90 * 60 else f"~{seconds / 3600:.1f} h"
