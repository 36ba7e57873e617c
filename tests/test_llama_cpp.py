"""Our GGUF files in llama.cpp itself (tools from scripts/build_llama_cpp.sh; these tests skip, saying so, where
they are not built): llama.cpp decodes every type to the same floats as we do, our named mixes give the per-tensor
types llama-quantize gives, and llama-perplexity agrees with slimlm's own evaluation of the same file."""
import json
import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from slimlm.evaluation.llama_cpp import llama_cpp_bin, llama_perplexity, run_tool
from slimlm.gguf.mixes import named_mix
from slimlm.gguf.quantize import to_gguf
from tests.conftest import REPO, llama_cpp_tools


@pytest.fixture(scope="module")
def llama_cpp():
    return llama_cpp_tools("llama-quantize")


@pytest.fixture(scope="module")
def wide_llama(builtin_folder):
    """A random 2-layer Llama with the built-in model's tokenizer (llama.cpp needs a vocabulary): 256-wide rows
    take K-types, ffn_down's 288-wide rows take llama-quantize's fallbacks (Q4_0, Q5_0, Q5_1, Q8_0)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=288, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval(), AutoTokenizer.from_pretrained(builtin_folder)


def tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


# every type appears in one of these files (checked below)
DECODE_MIXES = {"Q2_K": {"Q2_K", "Q3_K", "Q4_0", "Q6_K"}, "Q4_K_M": {"Q4_K", "Q5_0", "Q6_K", "Q8_0"},
                "Q5_K_M": {"Q5_K", "Q5_1"}, "Q4_1": {"Q4_1"}, "IQ4_XS": {"IQ4_XS", "IQ4_NL"}}


@pytest.mark.parametrize("mix", DECODE_MIXES)
def test_llama_cpp_decodes_our_blocks_to_our_floats(llama_cpp, wide_llama, tmp_path, mix):
    """llama-quantize --allow-requantize to F32 decodes each tensor with ggml's own dequantize_row_*; the floats
    must equal the gguf package's decoding of our bytes and the values our quantizer computed, bit for bit."""
    model, tok = wide_llama
    ours = to_gguf(model, tok, tmp_path / "ours.gguf", mix, method="rtn", progress=False)
    run_tool("llama-quantize", ["--allow-requantize", ours, tmp_path / "f32.gguf", "F32", 1])
    decoded = tensors(tmp_path / "f32.gguf")
    kinds = set()
    for name, t in tensors(ours).items():
        kinds.add(t.tensor_type.name)
        ggml = np.asarray(decoded[name].data, dtype=np.float32).reshape(-1)
        package = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        assert np.array_equal(ggml.view(np.uint32), package.view(np.uint32)), name
    assert DECODE_MIXES[mix] <= kinds


def test_the_decode_files_cover_every_type():
    from slimlm.gguf.types import TYPES

    assert set().union(*DECODE_MIXES.values()) == set(TYPES)


@pytest.fixture(scope="module")
def smollm_f16(llama_cpp, builtin_folder, tmp_path_factory):
    from slimlm.core.models import load_model

    model, tok = load_model(str(builtin_folder))
    return to_gguf(model, tok, tmp_path_factory.mktemp("f16") / "f16.gguf", "F16", method="rtn", progress=False)


@pytest.mark.parametrize("mix", ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_NL",
                                 "IQ4_XS"])
def test_named_mixes_equal_llama_quantize_types(smollm_f16, tmp_path, mix):
    run_tool("llama-quantize", [smollm_f16, tmp_path / "q.gguf", mix, 1])
    theirs = {name: t.tensor_type.name for name, t in tensors(tmp_path / "q.gguf").items()}
    shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in tensors(smollm_f16).items()}
    assert named_mix(mix, shapes, 30, gqa=3) == theirs


@pytest.mark.parametrize("mix", ["IQ4_NL", "IQ4_XS"])
def test_iq4_rounding_is_at_least_as_close_as_llama_quantizes(smollm_f16, tmp_path, mix):
    """The same F16 tensors through llama-quantize and through our fit (no imatrix on either side): our error,
    weighted as llama-quantize weighs it without an imatrix (x²), is no larger in total than theirs."""
    from slimlm.gguf.types import TYPES, fit

    run_tool("llama-quantize", [smollm_f16, tmp_path / "q.gguf", mix, 1])
    source = tensors(smollm_f16)
    ours_total = theirs_total = 0.0
    for name, t in tensors(tmp_path / "q.gguf").items():
        if t.tensor_type.name in ("IQ4_NL", "IQ4_XS") and int(name.split(".")[1]) % 10 == 0:  # blocks 0, 10, 20
            W = torch.from_numpy(np.asarray(source[name].data, dtype=np.float32).copy()).reshape(
                int(source[name].shape[1]), int(source[name].shape[0]))
            theirs = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(W.shape)
            ours_total += (W.square() * (fit(TYPES[t.tensor_type.name], W).values() - W).square()).sum().item()
            theirs_total += (W.square() * (theirs - W).square()).sum().item()
    assert theirs_total > 0 and ours_total <= theirs_total * (1 + 1e-6)


def second_half_perplexity(model, tok, text: Path, ctx: int, chunks: int) -> float:
    """slimlm's model scored as llama-perplexity scores: the text's bytes tokenized as the file says (BOS first if
    the tokenizer adds one), chunks of ``ctx`` tokens each starting with BOS, only the second half scored."""
    ids = tok(text.read_bytes().decode("utf-8"), add_special_tokens=False)["input_ids"]
    adds_bos = tok("a")["input_ids"][0] == tok.bos_token_id
    ids = [tok.bos_token_id] + ids if adds_bos else ids
    nll, count = 0.0, 0
    with torch.no_grad():
        for c in range(chunks):
            chunk = ids[c * ctx : (c + 1) * ctx]
            chunk = [tok.bos_token_id] + chunk[1:] if adds_bos else chunk
            logits = model(torch.tensor([chunk])).logits[0].float()
            logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(chunk[1:]).unsqueeze(1))[:, 0]
            nll -= logp[ctx // 2 :].sum().item()  # logits from position ctx/2 on score the tokens after it
            count += logp[ctx // 2 :].numel()
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def short_text(tmp_path_factory, data_dir):
    text = tmp_path_factory.mktemp("text") / "text.txt"
    text.write_bytes((Path(data_dir) / "wikitext2" / "test.raw").read_bytes()[:20000])
    return text


def test_llama_perplexity_agrees_with_slimlm_on_the_same_file(llama_cpp, builtin_folder, tmp_path, short_text):
    """Same file, same tokens, same scoring: the perplexities of llama.cpp and of slimlm's model (its weights left
    at the file's values) agree within 1%."""
    from slimlm.core.models import load_model

    model, tok = load_model(str(builtin_folder))
    path = to_gguf(model, tok, tmp_path / "q4km.gguf", "Q4_K_M", method="rtn", progress=False)
    theirs = llama_perplexity(path, short_text, ctx=128, chunks=4)["perplexity"]
    ours = second_half_perplexity(model, tok, short_text, 128, 4)
    assert abs(ours / theirs - 1) < 0.01, (ours, theirs)


# gemma3: a global layer that llama.cpp's default pattern (every sixth) would call sliding, a 32-token window that
# bites at ctx 128, a different rope base per layer kind and linear rope scaling on the global layers
GEMMA3 = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "num_hidden_layers": 3,
          "sliding_window": 32, "query_pre_attn_scalar": 64,
          "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}


@pytest.mark.parametrize("model_type, extra", [("qwen2", {}), ("qwen3", {}), ("gemma3_text", GEMMA3)])
def test_other_architectures_run_in_llama_cpp_as_in_slimlm(llama_cpp, builtin_folder, tmp_path, short_text,
                                                            model_type, extra):
    """Random small Qwen2 (q/k/v biases), Qwen3 (q/k norms, explicit head_dim) and Gemma3 (sliding windows,
    (1 + w) norms, scaled embeddings) models with the built-in tokenizer, written as Q8_0: llama.cpp loads them
    and its perplexity matches slimlm's within 1%, which needs the architecture, its hyperparameters and the
    rotary layout (NEOX: rows as HF has them) right."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "initializer_range": 0.1} | extra)
    model = AutoModelForCausalLM.from_config(config).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias") or name.endswith("norm.weight"):
            torch.nn.init.normal_(p, std=0.1)  # nonzero biases and norms off their init, so a slip would show
    tok = AutoTokenizer.from_pretrained(builtin_folder)
    path = to_gguf(model, tok, tmp_path / "q8.gguf", "Q8_0", method="rtn", progress=False)
    theirs = llama_perplexity(path, short_text, ctx=128, chunks=2)["perplexity"]
    ours = second_half_perplexity(model, tok, short_text, 128, 2)
    assert abs(ours / theirs - 1) < 0.01, (ours, theirs)


def llama_cpp_tokens(path, text: str) -> list[int]:
    """The ids llama.cpp's tokenizer gives ``text``: llama-tokenize prints them on stdout itself (llama-completion's
    --verbose-prompt listing goes through llama.cpp's logging thread, which lost its output at exit in CI)."""
    done = subprocess.run([str(llama_cpp_bin() / "llama-tokenize"), "-m", str(path), "-p", text, "--ids",
                           "--log-disable"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["qwen2", "llama-bpe"])
def test_pre_tokenizers_split_text_as_the_models_tokenizer(llama_cpp, builtin_folder, tmp_path, name):
    """The built-in vocabulary, plus the tokens '12' and '123' merged first, behind Qwen2's and Llama 3's
    pre-tokenizers (a Split regex, then byte-level; Llama 3 also ignores merges for whole-vocabulary words): the
    file names llama.cpp's matching pre-tokenizer, and llama.cpp splits a text with digits (one by one for Qwen2,
    up to three together for Llama 3), contractions, newlines, runs of spaces and accents into exactly the ids
    transformers gives."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from slimlm.gguf.tokenizer import PRE_TOKENIZERS
    from tests.conftest import tiny_llama

    spec = json.loads(AutoTokenizer.from_pretrained(builtin_folder).backend_tokenizer.to_str())
    regex = next(steps[0][1] for steps, pre in PRE_TOKENIZERS.items() if pre == name)
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    vocab = spec["model"]["vocab"]
    vocab["12"], vocab["123"] = len(vocab), len(vocab) + 1
    spec["model"]["merges"] = [["1", "2"], ["12", "3"], *spec["model"]["merges"]]
    spec["model"]["ignore_merges"] = name == "llama-bpe"
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    path = to_gguf(tiny_llama(vocab=len(vocab)), tok, tmp_path / "t.gguf", "Q8_0", method="rtn", progress=False)
    assert gguf.GGUFReader(path).get_field("tokenizer.ggml.pre").contents() == name
    text = "Hello 12345 world's DON'T stop\n\n  two  spaces   3.14159 émigré naïve 2024-12-02 x=y+1;"
    ours = tok(text)["input_ids"]
    assert (vocab["123"] in ours) == (name == "llama-bpe") and len(ours) > 20
    assert llama_cpp_tokens(path, text) == ours


def sentencepiece_bpe(text: str, prepend: bool, size: int = 800):
    """A SentencePiece-style BPE tokenizer trained on ``text``: '▁' for spaces (put before the text too when
    ``prepend``, as Llama 2's; not, as Gemma's), byte fallback, and every split of a piece into two pieces as a
    merge in the pieces' order, as transformers' SentencePiece converters write them."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581")] * prepend +
                                                [normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                           decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)],
                                  show_progress=False)
    tokenizer.train_from_iterator([w if prepend else "\u2581" + w for w in text.split()], trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    spec["model"]["merges"] = [[p[:i], p[i:]] for p, _ in sorted(vocab.items(), key=lambda kv: kv[1])
                               if p not in specials for i in range(1, len(p)) if p[:i] in vocab and p[i:] in vocab]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("prepend", [False, True], ids=["gemma-style", "llama2-style"])
def test_sentencepiece_tokenizers_split_text_as_transformers(llama_cpp, short_text, tmp_path, prepend):
    """SentencePiece-style BPE (Gemma, Llama 2, Mistral) goes in as llama.cpp's 'llama' tokenizer, scores from
    the merge ranks: llama.cpp's ids for unseen text (accents that only byte fallback covers, digits, spaces)
    equal transformers'."""
    from tests.conftest import tiny_llama

    tok = sentencepiece_bpe(short_text.read_text(), prepend)
    path = to_gguf(tiny_llama(vocab=len(tok)), tok, tmp_path / "t.gguf", "Q8_0", method="rtn", progress=False)
    assert gguf.GGUFReader(path).get_field("tokenizer.ggml.model").contents() == "llama"
    text = "Hello world, 12345 émigré naïve Zürich  two  spaces: the history of the band's album (1998)."
    ours = tok(text)["input_ids"]
    assert len(ours) > 30 and tok.convert_tokens_to_ids("<0xC3>") in ours  # byte fallback used
    assert llama_cpp_tokens(path, text) == ours


def test_eval_engine_llama_cpp_and_bad_files(llama_cpp, smollm_f16, tmp_path, data_dir):
    argv = [sys.executable, "-m", "slimlm", "eval", str(smollm_f16), "--engine", "llama.cpp", "--eval-seqlen",
            "128", "--eval-windows", "2", "--data-dir", data_dir, "--kld-reference", str(smollm_f16)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    # the native engine's schema: perplexity over windows of seqlen tokens, the source's figure beside it
    assert (result["engine"], result["windows"], result["seqlen"]) == ("llama.cpp", 2, 128)
    assert result["perplexity"] > 1 and abs(result["kld"]) < 1e-3
    assert result["perplexity"] == pytest.approx(result["source_perplexity"], rel=1e-4)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\0" * 64)
    done = subprocess.run([*argv[:4], str(corrupt), *argv[5:13]], capture_output=True, text=True, cwd=REPO)
    # refused from its header before llama.cpp runs (whose own reason would be lost behind "failed to load model")
    assert done.returncode == 2 and "corrupt.gguf is not a GGUF file" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("shrink_args", [{"drop_layers": 1}, {"params": 0.7, "allocation": "uniform"},
                                         {"params": 0.7, "allocation": "flap"}],
                         ids=["depth", "uniform-width", "per-layer-widths"])
def test_shrunk_models_run_in_llama_cpp_as_in_slimlm(llama_cpp, builtin_folder, tmp_path, short_text, shrink_args):
    """A random llama with a layer removed, with the same heads and MLP channels removed from every layer (FLAP's
    compensation biases on o_proj and down_proj), or with widths that differ per layer (GGUF's per-layer head
    and MLP-width arrays, which llama.cpp reads for its 'deci' architecture only): llama.cpp loads each as written
    and its perplexity matches slimlm's within 1%."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from slimlm.structured.shrink import shrink

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                  num_attention_heads=8, num_key_value_heads=4, vocab_size=49152,
                                  max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.1)
    model = AutoModelForCausalLM.from_config(config).eval()
    tok = AutoTokenizer.from_pretrained(builtin_folder)
    calib = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    shrink(model, calib=calib, progress=False, **shrink_args)
    path = to_gguf(model, tok, tmp_path / "q8.gguf", "Q8_0", method="rtn", progress=False)
    per_layer = "flap" in shrink_args.values()
    arch = "deci" if per_layer else "llama"
    assert gguf.GGUFReader(path).get_field("general.architecture").contents() == arch
    assert isinstance(gguf.GGUFReader(path).get_field(f"{arch}.attention.head_count").contents(), list) == per_layer
    theirs = llama_perplexity(path, short_text, ctx=128, chunks=2)["perplexity"]
    ours = second_half_perplexity(model, tok, short_text, 128, 2)
    assert abs(ours / theirs - 1) < 0.01, (ours, theirs)
