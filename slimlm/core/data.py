"""Calibration and evaluation token windows.

Sources: ``wikitext2`` and ``c4`` (through the ``datasets`` library, or offline from a data folder laid
out like ``shared/data``: ``wikitext2/test.raw``, ``wikitext2/valid.tokens``), or any local text file.

Protocol (Wanda/SparseGPT/GPTQ papers): the evaluation text is tokenized as one string and cut into
non-overlapping windows; calibration windows are ``nsamples`` windows of ``seqlen`` tokens, taken
either at seeded random offsets (the papers' choice) or as the first non-overlapping windows.
WikiText-2 calibration reads the *validation* split, never the test split we report on.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from slimlm.core.hub import require_hub
from slimlm.errors import SlimlmError

# source -> split -> file inside the offline data folder
OFFLINE_FILES = {"wikitext2": {"test": "wikitext2/test.raw", "calib": "wikitext2/valid.tokens"}}
# The offline calibration file is WikiText-2's tokenized release; online we read the same release.
HF_WIKITEXT = {"test": ("wikitext-2-raw-v1", "test"), "calib": ("wikitext-2-v1", "validation")}
# The C4 shards every paper of this line uses (SparseGPT/Wanda/OWL data loaders).
C4_FILES = {"calib": ("train", "en/c4-train.00000-of-01024.json.gz"),
            "test": ("validation", "en/c4-validation.00000-of-00008.json.gz")}
C4_EVAL_DOCS = 1100  # the papers join the first 1100 validation documents for C4 perplexity


# named sources read through the datasets library -> what to do instead offline
HUB_SOURCES = {"wikitext2": "pass --data-dir DIR or set SLIMLM_DATA_DIR (a folder with wikitext2/test.raw and "
                            "wikitext2/valid.tokens)",
               "c4": "use wikitext2 with --data-dir DIR, or a local text file"}


def data_dir(explicit: str | None = None) -> Path | None:
    value = explicit or os.environ.get("SLIMLM_DATA_DIR")
    if not value:
        return None
    path = Path(value)
    if not path.is_dir():
        raise SlimlmError(f"data folder not found: {path}")
    return path


def check_source(source: str) -> None:
    if source not in HUB_SOURCES and not Path(source).is_file():
        raise SlimlmError(f"unknown data source '{source}': not wikitext2, c4, or a readable text file")


def check_data(source: str, data_folder: str | None = None) -> None:
    """Fail in about a second, before a model is loaded, when ``source`` cannot be read: an unknown name,
    a missing data folder, or a hub source when the hub cannot be reached."""
    check_source(source)
    folder = data_dir(data_folder)
    if source in HUB_SOURCES and (folder is None or source not in OFFLINE_FILES):
        require_hub(f"dataset {source}", HUB_SOURCES[source])


def load_text(source: str, split: str, data_folder: str | None = None) -> str:
    """Raw text of ``source`` for ``split`` ('calib' or 'test')."""
    check_source(source)
    if source not in HUB_SOURCES:
        path = Path(source)
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SlimlmError(f"cannot read text file {path}: {e}") from e
    folder = data_dir(data_folder)
    if folder is not None and source in OFFLINE_FILES:
        path = folder / OFFLINE_FILES[source][split]
        if not path.is_file():
            raise SlimlmError(f"{path} is missing from the data folder")
        return path.read_text(encoding="utf-8")
    if source == "c4":
        return " ".join(_c4_documents(split)[:C4_EVAL_DOCS])
    name, hf_split = HF_WIKITEXT[split]
    return "\n\n".join(_hf_dataset("wikitext2", "wikitext", name, split=hf_split)["text"])


def _hf_dataset(source: str, *args, **kwargs):
    """``datasets.load_dataset(*args, **kwargs)`` for the named ``source``, after the hub check."""
    require_hub(f"dataset {source}", HUB_SOURCES[source])
    try:
        import datasets
    except ImportError as e:
        raise SlimlmError(f"dataset {source} needs the datasets package: `pip install datasets`; or "
                          f"{HUB_SOURCES[source]}") from e
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # network and hub errors come in many types
        raise SlimlmError(f"cannot load dataset {source} ({type(e).__name__}); offline, "
                          f"{HUB_SOURCES[source]}") from e


def _c4_documents(split: str) -> list[str]:
    hf_split, shard = C4_FILES[split]
    return _hf_dataset("c4", "allenai/c4", data_files={hf_split: shard}, split=hf_split)["text"]


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Token ids of the whole text as one string, with the tokenizer's default settings (1-D)."""
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``(n, seqlen)`` from the start; the tail shorter than seqlen is dropped."""
    n = tokens.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise SlimlmError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return tokens[: n * seqlen].view(n, seqlen)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int,
                        sampling: str = "random", seed: int = 0) -> torch.Tensor:
    """``(nsamples, seqlen)`` windows: seeded random offsets, or the first non-overlapping ones."""
    if nsamples < 1 or seqlen < 2:
        raise SlimlmError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    if sampling == "first":
        if tokens.numel() < nsamples * seqlen:
            raise SlimlmError(f"calibration text has {tokens.numel()} tokens; "
                              f"{nsamples} windows of {seqlen} need {nsamples * seqlen}")
        return tokens[: nsamples * seqlen].view(nsamples, seqlen).clone()
    if sampling != "random":
        raise SlimlmError(f"unknown calibration sampling '{sampling}': use random or first")
    if tokens.numel() <= seqlen:
        raise SlimlmError(f"calibration text has {tokens.numel()} tokens, too few for windows of {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([tokens[s: s + seqlen] for s in starts.tolist()])


def calibration_data(source: str, tokenizer, nsamples: int, seqlen: int, sampling: str = "random",
                     seed: int = 0, data_folder: str | None = None) -> torch.Tensor:
    """Calibration windows from a named source or text file."""
    if source == "c4" and data_dir(data_folder) is None:
        return _c4_calibration(tokenizer, nsamples, seqlen, seed)
    tokens = tokenize(load_text(source, "calib", data_folder), tokenizer)
    return calibration_windows(tokens, nsamples, seqlen, sampling, seed)


def _c4_calibration(tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The papers' C4 sampler: a random document longer than seqlen, then a random window in it."""
    docs = _c4_documents("calib")
    gen = torch.Generator().manual_seed(seed)
    windows = []
    while len(windows) < nsamples:
        doc = docs[int(torch.randint(len(docs), (1,), generator=gen))]
        ids = tokenize(doc, tokenizer)
        if ids.numel() > seqlen:
            start = int(torch.randint(ids.numel() - seqlen, (1,), generator=gen))
            windows.append(ids[start: start + seqlen])
    return torch.stack(windows)
