"""A model's calibration windows: loaded (``core.data``) or given, checked against its vocabulary, and the
manifest record that describes them. Every compressing stage (prune, quantize, GGUF, shrink, lowrank) takes its
data through ``calibration_for``.
"""
from __future__ import annotations

import torch

from slimlm.core import data as data_mod
from slimlm.errors import SlimlmError


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


def calibration_for(model, tokenizer, calib: torch.Tensor | None, c, data_dir: str | None):
    """The calibration windows (``calib`` when given, else read as the calibration settings ``c``, a
    ``config.CalibrationConfig``, say) and the manifest record describing them."""
    if calib is None:
        calib = calibration(tokenizer, c.calib, c.nsamples, c.seqlen, c.calib_sampling, c.seed, data_dir)
    check_tokens(model, calib)
    info = {"source": c.calib, "nsamples": calib.shape[0], "seqlen": calib.shape[1], "sampling": c.calib_sampling,
            "seed": c.seed, "tokens": calib.numel(), "bos_added": adds_bos(tokenizer)}
    return calib, info


def adds_bos(tokenizer) -> bool | None:
    """Whether the tokenizer puts its BOS token first (None without a tokenizer)."""
    if tokenizer is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id
