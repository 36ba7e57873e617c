"""A model's tokenizer as GGUF ``tokenizer.ggml.*`` metadata, in the form llama.cpp's tokenizers read.

Two kinds (ggml docs/gguf.md, tokenizer section): byte-level BPE ('gpt2': GPT-2, SmolLM, Qwen2, Llama 3), where
llama.cpp needs the merges and the name of the pre-tokenizer that splits text before them; and SentencePiece-style
BPE with byte fallback ('llama': Llama 2, Mistral, Gemma), where llama.cpp merges the adjacent pair whose merged
piece has the highest score, so each piece's score is minus the rank of the first merge that makes it (the order
transformers' converters write merges in, from the SentencePiece scores).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf

from slimlm.core.models import BUILTIN_MODELS, builtin_gguf
from slimlm.errors import SlimlmError
from slimlm.gguf.metadata import read_metadata

logger = logging.getLogger(__name__)

# tokenizer.json pre-tokenizer steps -> llama.cpp's pre-tokenizer name (which brings its regex and flags). A step is
# (type, what varies): Digits' individual_digits, ByteLevel's use_regex, Split's regex. The two regexes are the
# ones Qwen2's and Llama 3's tokenizer.json carry (they differ only in \p{N} vs \p{N}{1,3}).
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {(("ByteLevel", True),): "gpt-2",
                  (("Digits", True), ("ByteLevel", True)): "smollm",
                  (("Split", _SPLIT % ""), ("ByteLevel", False)): "qwen2",
                  (("Split", _SPLIT % "{1,3}"), ("ByteLevel", False)): "llama-bpe"}
SPACE = "\u2581"  # SentencePiece's visible space


def add_tokenizer(writer: gguf.GGUFWriter, tok, source, vocab_size: int) -> None:
    """Tokens by id (padded to the embedding's rows with unused '[PADi]'), types, merges or scores, special ids,
    BOS/EOS flags and chat template. ``source``: the model the tokenizer came from (a GGUF file keeps its
    pre-tokenizer name). A tokenizer llama.cpp would run differently is refused."""
    if tok is None:
        logger.warning("no tokenizer: the GGUF gets no vocabulary (transformers loads its weights, llama.cpp "
                       "needs a vocabulary to run it)")
        return
    spec = json.loads(tok.backend_tokenizer.to_str())
    model, decoder = spec["model"], spec.get("decoder") or {}
    if model["type"] != "BPE":
        raise SlimlmError(f"GGUF: {model['type']} tokenizers are not written (byte-level or SentencePiece BPE are)")
    tokens, types = _vocabulary(tok, spec, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    if decoder.get("type") == "ByteLevel":
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(spec, source, tokens))
        writer.add_token_merges(merges)
        writer.add_add_space_prefix(False)
    elif model.get("byte_fallback"):
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(_scores(tokens, merges))
        types = [gguf.TokenType.BYTE if len(t) == 6 and t.startswith("<0x") and t.endswith(">") and
                 kind == gguf.TokenType.NORMAL else kind for t, kind in zip(tokens, types)]
        writer.add_add_space_prefix(_prepends_space(spec.get("normalizer") or {}))
    else:
        raise SlimlmError("GGUF: a BPE tokenizer that is neither byte-level nor byte-fallback is not written")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    _add_specials(writer, tok)


def _vocabulary(tok, spec: dict, vocab_size: int) -> tuple[list[str], list[gguf.TokenType]]:
    """Tokens by id and their types: control = special added token, user-defined = other added token."""
    ids = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    if max(ids.values()) >= vocab_size:
        raise SlimlmError(f"the tokenizer has ids up to {max(ids.values())}, the model only {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in ids.items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for added in spec["added_tokens"]:
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    unk = spec["model"].get("unk_token")
    if unk in ids:
        types[ids[unk]] = gguf.TokenType.UNKNOWN
    return tokens, types


def _scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores from merge ranks: -(rank of the first merge making the piece); pieces no merge makes
    (characters, bytes, specials) are never a merge's result, so their score is not read: 0."""
    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _prepends_space(normalizer: dict) -> bool:
    """Whether the normalizer puts a '▁' before the text (Llama 2, Mistral; Gemma does not)."""
    steps = normalizer.get("normalizers", [normalizer])
    return any(s.get("type") == "Prepend" and s.get("prepend") == SPACE for s in steps)


def _add_specials(writer: gguf.GGUFWriter, tok) -> None:
    for token_id, add in ((tok.bos_token_id, writer.add_bos_token_id), (tok.eos_token_id, writer.add_eos_token_id),
                          (tok.unk_token_id, writer.add_unk_token_id), (tok.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    sample = tok("a")["input_ids"]
    writer.add_add_bos_token(bool(sample) and sample[0] == tok.bos_token_id)
    writer.add_add_eos_token(len(sample) > 1 and sample[-1] == tok.eos_token_id)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _pre_tokenizer(spec: dict, source, tokens: list[str]) -> str:
    """llama.cpp's pre-tokenizer name. A run made from a GGUF file keeps that file's name (transformers drops it
    when it reads the file, so the run's tokenizer.json cannot tell); otherwise it is read off the
    pre-tokenizer's steps (``PRE_TOKENIZERS``); an unknown one is refused, since llama.cpp would split the text
    differently from the model's own tokenizer."""
    source = _source_gguf(source)
    if source is not None:
        fields = read_metadata(source, ("tokenizer.ggml.pre", "tokenizer.ggml.tokens"))
        if "tokenizer.ggml.pre" in fields and fields.get("tokenizer.ggml.tokens") == tokens:
            return fields["tokenizer.ggml.pre"]
    pre = spec.get("pre_tokenizer") or {}
    detail = {"Digits": "individual_digits", "ByteLevel": "use_regex"}
    steps = tuple((s["type"], (s.get("pattern") or {}).get("Regex") if s["type"] == "Split"
                   else s.get(detail.get(s["type"], ""))) for s in pre.get("pretokenizers", [pre]))
    if steps not in PRE_TOKENIZERS:
        raise SlimlmError(f"GGUF: the tokenizer's pre-tokenizer {steps} has no llama.cpp name here "
                          f"(known: {', '.join(PRE_TOKENIZERS.values())}); llama.cpp would split text differently")
    return PRE_TOKENIZERS[steps]


def _source_gguf(model) -> Path | None:
    if model in BUILTIN_MODELS:
        try:
            return builtin_gguf(model)
        except SlimlmError:
            return None
    return Path(model) if isinstance(model, str) and model.endswith(".gguf") and Path(model).is_file() else None
