"""Shared fixtures: tiny random models (no downloads), the built-in model, the offline data folder."""
import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N (the suite's default, pyproject addopts): N workers share the cores, so each computes on one thread
    # (OpenMP threads oversubscribed spin and stall); its subprocesses inherit the setting
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("SLIMLM_DATA_DIR", REPO.parent / "shared" / "data"))


def tiny_llama(seed: int = 0, layers: int = 2, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def trapped_llama(layers: int = 4):
    """A tiny Llama whose block 0 carries the model: its output projections are scaled up, so compressing it hard is
    measurably costly (the allocation checks' planted trap)."""
    model = tiny_llama(layers=layers)
    with torch.no_grad():
        block = model.model.layers[0]
        block.self_attn.o_proj.weight.mul_(6)
        block.mlp.down_proj.weight.mul_(6)
    return model


def held_out_kld(source, model, held: torch.Tensor) -> float:
    """Mean per-token KL(source ‖ model) over the windows ``held``, computed with torch's kl_div (not slimlm's)."""
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for w in held:
            p = F.log_softmax(source(input_ids=w[None], use_cache=False).logits[0].float(), -1)
            q = F.log_softmax(model(input_ids=w[None], use_cache=False).logits[0].float(), -1)
            total += F.kl_div(q, p, log_target=True, reduction="sum").item()
            count += w.numel()
    return total / count


def tiny_qwen(version: int = 2, seed: int = 0, layers: int = 2, vocab: int = 128):
    """A tiny Qwen2 (biases on q/k/v) or Qwen3 (RMSNorm on each query and key head), tied embeddings; the biases
    and norms perturbed away from their 0 / 1 initialisation so that transforms which ignored them would show."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_class, model_class = {2: (Qwen2Config, Qwen2ForCausalLM), 3: (Qwen3Config, Qwen3ForCausalLM)}[version]
    torch.manual_seed(seed)
    config = config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=vocab, max_position_embeddings=256,
                          tie_word_embeddings=True)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


# Llama-family layouts the outlier transforms support: Llama, Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms)
LLAMA_FAMILY = {"llama": tiny_llama, "qwen2": lambda: tiny_qwen(2), "qwen3": lambda: tiny_qwen(3)}


def tiny_opt(seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                       max_position_embeddings=256, word_embed_proj_dim=64)
    return OPTForCausalLM(config).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(params=["llama", "opt"])
def tiny_model(request):
    return tiny_llama() if request.param == "llama" else tiny_opt()


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not (DATA_DIR / "wikitext2" / "test.raw").is_file():
        pytest.fail(f"offline data folder missing: {DATA_DIR} (set SLIMLM_DATA_DIR)")
    return str(DATA_DIR)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama saved with a real (built-in model's) tokenizer: a model folder the CLI can load."""
    from transformers import AutoTokenizer

    from slimlm.core.cache import gguf_to_folder
    from slimlm.core.models import builtin_gguf

    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama(vocab=49152).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf_to_folder(builtin_gguf("smollm2-135m"))).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def calib(tmp_path_factory, data_dir):
    """A short calibration text (tokenizing all of WikiText-2 would dominate these tiny runs)."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text((Path(data_dir) / "wikitext2" / "test.raw").read_text()[:20000])
    return str(path)


@pytest.fixture(scope="session")
def builtin_folder():
    """The built-in model converted once to a float32 folder (cached in $SLIMLM_CACHE)."""
    from slimlm.core.cache import gguf_to_folder
    from slimlm.core.models import builtin_gguf

    return gguf_to_folder(builtin_gguf("smollm2-135m"))


def llama_cpp_tools(tool: str = "llama-quantize"):
    """The folder of llama.cpp's tools. Where they are not built a test skips, saying so; under CI (CI=true) it
    fails, since CI builds them first and a missing build must not pass as skipped checks."""
    from slimlm.evaluation.llama_cpp import llama_cpp_bin

    folder = llama_cpp_bin()
    if folder is None or not (folder / tool).is_file():
        message = f"llama.cpp tools are not built ({tool} missing; bash scripts/build_llama_cpp.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ", and CI=true: CI must build them")
        pytest.skip(message)
    return folder
