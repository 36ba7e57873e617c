"""Write a random-weight Llama checkpoint larger than this machine's RAM, one shard at a time.

    python bench/synthetic_llama.py /work/big/llama-30g            # float32, ~30.75 GB on disk

Tensor names and shapes come from the model built on the meta device from the config, so the checkpoint
is exactly what transformers expects; each decoder block is generated and written as its own shard (the
whole model is never in memory), the embeddings, final norm and untied LM head as the last shard, then the
shard index, config, and the built-in model's tokenizer (same 49152-token vocabulary).
Weights: N(0, 0.02²) for embeddings and linears, ones for the RMSNorm scales (the Llama initialisation).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# Llama-2-7B's block shapes (hidden 4096, MLP 11008, 32 heads) with the built-in model's vocabulary
CONFIG = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=32,
              num_key_value_heads=32, vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=False)


def random_tensor(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.randn(shape, generator=gen).mul_(0.02)


def write_checkpoint(folder: str | Path, layers: int = CONFIG["num_hidden_layers"], seed: int = 0) -> dict:
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slimlm.core.cache import gguf_to_folder
    from slimlm.core.models import builtin_gguf
    from slimlm.runs.resume import write_tensors
    from slimlm.core.shards import INDEX, expected_tensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=False)
    config = LlamaConfig(**(CONFIG | {"num_hidden_layers": layers}))
    with init_empty_weights():
        names = {n: tuple(t.shape) for n, t in expected_tensors(LlamaForCausalLM(config)).items()}
    groups: dict[str, list[str]] = {}  # shard file -> tensor names: one per block, then the rest
    for name in names:
        block = name.split(".")[2] if name.startswith("model.layers.") else None
        index = int(block) if block is not None else layers
        groups.setdefault(f"model-{index + 1:05d}-of-{layers + 1:05d}.safetensors", []).append(name)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for shard, group in sorted(groups.items()):
        write_tensors({n: random_tensor(n, names[n], gen) for n in group}, folder / shard, {"format": "pt"})
        print(f"{shard} written ({time.perf_counter() - start:.0f} s)", flush=True)
    total = sum(torch.Size(s).numel() * 4 for s in names.values())
    weight_map = {n: shard for shard, group in groups.items() for n in group}
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf_to_folder(builtin_gguf("smollm2-135m"))).save_pretrained(folder)
    return {"folder": str(folder), "bytes": total, "params": total // 4, "layers": layers,
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="output folder (must not exist)")
    parser.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(write_checkpoint(args.folder, args.layers, args.seed)))


if __name__ == "__main__":
    main()
