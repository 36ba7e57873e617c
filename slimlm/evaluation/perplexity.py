"""Perplexity with the literature's protocol (Wanda/SparseGPT/GPTQ evaluation code).

The test text is tokenized as one string and cut into non-overlapping windows of ``seqlen`` tokens;
each window is scored on its own (no context carried over), with the usual causal shift: logits at
positions 0..T-2 predict tokens 1..T-1. Perplexity = exp(mean negative log-likelihood over all
predicted tokens).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimlm.errors import SlimlmError


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
    """Perplexity of ``model`` on ``windows`` ``(n, seqlen)``; the model is moved to ``device``."""
    model.to(device)
    n, seqlen = windows.shape
    total_nll, count = 0.0, 0
    start = time.perf_counter()
    for s in tqdm(range(0, n, batch_size), desc="eval", disable=not progress):
        ids = windows[s:s + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        count += ids[:, 1:].numel()
    seconds = time.perf_counter() - start
    mean_nll = total_nll / count
    if not math.isfinite(mean_nll):
        raise SlimlmError("non-finite loss during evaluation; the model produced NaN/inf logits")
    return PerplexityResult(math.exp(mean_nll), mean_nll, n, seqlen, n * seqlen / seconds, seconds)
