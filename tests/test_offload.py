"""Streaming blocks from disk (--offload disk), resuming killed runs, and bad checkpoints.

Reference for every equality below: the same command run in memory and uninterrupted; weights must match
bit for bit (torch.equal), as the streamed and resumed runs promise the very same computation.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimlm.cli import main
from tests.conftest import REPO

BLOCKS = 4

# Runs slimlm's CLI, but stops itself (SIGSTOP) right after the given method ran for block AFTER, so the
# parent can SIGKILL it at a known point: Checkpoint.save (block fully checkpointed) or ShardStream.store
# (block's shard written, progress not yet).
STOPPER = """
import os, signal, sys
from slimlm.cli import main
from slimlm.runs import offload, resume
method, after = sys.argv[1], int(sys.argv[2])
cls = resume.Checkpoint if method == "save" else offload.ShardStream
original = getattr(cls, method)
def stop_after(self, i, *args):
    original(self, i, *args)
    if i == after:
        os.kill(os.getpid(), signal.SIGSTOP)
setattr(cls, method, stop_after)
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny 4-block Llama with tied embeddings (like the built-in model), in several safetensors shards,
    with the built-in model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slimlm.core.cache import gguf_to_folder
    from slimlm.core.models import builtin_gguf

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=BLOCKS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256,
                         tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("src")
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(gguf_to_folder(builtin_gguf("smollm2-135m"))).save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    return folder


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def weights(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors |= {f"{shard.name}:{k}" if shard.name.startswith("nm_") else k: v
                    for k, v in load_file(shard).items()}
    return tensors


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:3]


def prune_args(src, out, calib, *extra):
    return ["prune", str(src), "--out", str(out), "--calib", calib, "--nsamples", "2", "--seqlen", "32", "--quiet",
            *extra]


@pytest.mark.parametrize("command", [
    ["prune", "--method", "wanda", "--pattern", "2:4"],
    ["prune", "--method", "magnitude", "--sparsity", "0.6"],
    ["quantize", "--method", "gptq", "--wbits", "4", "--group-size", "32"],
])
def test_streamed_run_equals_in_memory_run(capsys, tmp_path, src, calib, command):
    from transformers import AutoModelForCausalLM

    args = [command[0], str(src), *command[1:], "--calib", calib, "--nsamples", "2", "--seqlen", "32", "--quiet"]
    assert cli(capsys, *args, "--out", str(tmp_path / "mem"))[0] == 0
    assert cli(capsys, *args, "--out", str(tmp_path / "disk"), "--offload", "disk")[0] == 0
    disk = tmp_path / "disk"
    assert (disk / "model.safetensors.index.json").is_file() and len(list(disk.glob("model-*"))) == BLOCKS + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "mem"]  # no partial folder left
    reloaded = {  # plain transformers reads both; the tied LM head comes back tied
        name: AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32).state_dict()
        for name in ("mem", "disk")}
    assert all(torch.equal(reloaded["mem"][k], reloaded["disk"][k]) for k in reloaded["mem"])
    assert torch.equal(reloaded["disk"]["lm_head.weight"], reloaded["disk"]["model.embed_tokens.weight"])
    manifests = [json.loads((tmp_path / name / "slimlm.json").read_text()) for name in ("mem", "disk")]
    assert manifests[0]["layers"] == manifests[1]["layers"]


def test_only_one_block_is_in_memory_at_a_time(tmp_path, src, calib):
    import slimlm
    from slimlm.core.architectures import decoder_blocks
    from slimlm.runs.offload import load_streamed

    model, tokenizer, stream = load_streamed(str(src), "float32", tmp_path / "out")
    blocks = decoder_blocks(model)
    materialised = []

    class Watched:
        def load(self, i, block):
            stream.load(i, block)
            materialised.append([j for j, b in enumerate(blocks) if not b.self_attn.q_proj.weight.is_meta])

        def store(self, i, block):
            stream.store(i, block)

    assert all(p.is_meta for b in blocks for p in b.parameters())
    assert not model.model.embed_tokens.weight.is_meta and not model.model.rotary_emb.inv_freq.is_meta
    slimlm.prune(model, tokenizer, method="wanda", nsamples=2, seqlen=32, calib_source=calib, io=Watched(),
                 progress=False)
    assert materialised == [[i] for i in range(BLOCKS)]
    assert all(p.is_meta for b in blocks for p in b.parameters())


def kill_after(tmp_path, method, after, argv):
    """Run the CLI in a subprocess, SIGKILL it once ``method`` has run for block ``after``."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(tmp_path / "stderr", "w") as err:
        child = subprocess.Popen([sys.executable, "-c", STOPPER, method, str(after), *argv], stderr=err, env=env)
        _, status = os.waitpid(child.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), (tmp_path / "stderr").read_text()[-2000:]
        child.send_signal(signal.SIGKILL)
        child.wait()


@pytest.mark.parametrize("method,after,extra,first", [
    # in memory, checkpointed because the first run asked for --resume; N:M permutations are checkpointed too
    ("save", 0, ["--method", "ria", "--pattern", "2:4", "--permute"], ["--resume"]),
    # streamed runs always checkpoint; killed after block 2's shard was written but before it was recorded
    ("store", 2, ["--method", "sparsegpt", "--sparsity", "0.5", "--offload", "disk"], []),
])
def test_killed_run_resumes_to_identical_weights(capsys, tmp_path, src, calib, method, after, extra, first):
    reference, out = tmp_path / "reference", tmp_path / "out"
    partial = tmp_path / ".out.partial"
    assert cli(capsys, *prune_args(src, reference, calib, *extra))[0] == 0
    kill_after(tmp_path, method, after, prune_args(src, out, calib, *extra, *first))
    # never looks complete: no output folder, and the hidden partial one has no manifest or config
    assert not out.exists() and partial.is_dir()
    assert not (partial / "slimlm.json").exists() and not (partial / "config.json").exists()
    assert json.loads((partial / "progress.json").read_text())["done"] == after + (method == "save")

    code, _, err = cli(capsys, *prune_args(src, out, calib, *extra))
    assert code == 2 and "pass --resume" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, *prune_args(src, out, calib, *extra, "--seed", "1", "--resume"))
    assert code == 2 and "other settings (seed: 0 -> 1)" in err and len(err.strip().splitlines()) == 1
    assert partial.is_dir() and not out.exists()

    assert cli(capsys, *prune_args(src, out, calib, *extra, "--resume"))[0] == 0
    assert not partial.exists()
    assert_same_weights(out, reference)
    layers = [json.loads((f / "slimlm.json").read_text())["layers"] for f in (out, reference)]
    assert layers[0] == layers[1]
    manifest = json.loads((out / "slimlm.json").read_text())  # the manifest says the run was resumed, and where
    processes = manifest["resumed"]
    assert [p["from_block"] for p in processes] == [0, after + (method == "save")]
    assert manifest["timings"]["total"] >= sum(p["seconds"] for p in processes[:-1])
    assert "resumed" not in json.loads((reference / "slimlm.json").read_text())


def test_disk_full_is_one_line_and_keeps_finished_blocks(capsys, tmp_path, src, calib, monkeypatch):
    import slimlm.runs.resume

    reference, out = tmp_path / "reference", tmp_path / "out"
    args = prune_args(src, out, calib, "--method", "wanda", "--offload", "disk")
    assert cli(capsys, *prune_args(src, reference, calib, "--method", "wanda", "--offload", "disk"))[0] == 0
    writes = []

    def full_disk(tensors, path, metadata=None):  # what safetensors raises on ENOSPC (seen on a full tmpfs)
        writes.append(path)
        if len(writes) > 3:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(slimlm.runs.resume, "save_file", full_disk)
    code, _, err = cli(capsys, *args)
    assert code == 2 and "no space left on device" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / ".out.partial" / "slimlm.json").exists()
    monkeypatch.undo()
    assert cli(capsys, *args, "--resume")[0] == 0
    assert_same_weights(out, reference)


def _remove_shard(folder):
    next(folder.glob("model-00002-*")).unlink()


def _corrupt_header(folder):
    shard = next(folder.glob("model-00002-*"))
    data = bytearray(shard.read_bytes())
    data[8:16] = b"garbage!"
    shard.write_bytes(bytes(data))


def _truncate(folder):
    shard = next(folder.glob("model-00002-*"))
    shard.write_bytes(shard.read_bytes()[:-100])


def _reshape(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = folder / index["model.layers.1.mlp.up_proj.weight"]
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(129, 64)
    save_file(tensors, shard, metadata={"format": "pt"})


def _drop_tensor(folder):
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = folder / index["weight_map"].pop("model.layers.2.self_attn.v_proj.weight")
    tensors = load_file(shard)
    del tensors["model.layers.2.self_attn.v_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))


@pytest.mark.parametrize("offload", [[], ["--offload", "disk"]])
@pytest.mark.parametrize("damage,message", [
    (_remove_shard, "named by model.safetensors.index.json is missing"),
    (_corrupt_header, "cannot read safetensors shard"),
    (_truncate, "cannot read safetensors shard"),
    (_reshape, "model.layers.1.mlp.up_proj.weight has shape [129, 64]"),
    (_drop_tensor, "model.layers.2.self_attn.v_proj.weight is missing"),
])
def test_bad_checkpoint_is_one_line_before_any_work(capsys, tmp_path, src, calib, damage, message, offload):
    if damage is _drop_tensor and not offload:
        pytest.skip("a missing tensor is transformers' call when loading in memory (it may be renamed)")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    damage(bad)
    code, _, err = cli(capsys, *prune_args(bad, tmp_path / "out", calib, *offload))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # nothing written, not even a partial folder


def test_pickled_weights_need_allow_pickle(capsys, tmp_path, src):
    from slimlm.core.models import load_model

    folder = tmp_path / "pickled"
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    reference = weights(src)
    torch.save(reference, folder / "pytorch_model.bin")
    code, _, err = cli(capsys, "eval", str(folder), "--quiet")
    assert code == 2 and "pass --allow-pickle" in err and len(err.strip().splitlines()) == 1
    model, _ = load_model(str(folder), allow_pickle=True)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, reference["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("extra,message", [
    (["--eval"], "--eval needs the whole model in memory"),
    (["--allocation", "owl"], "with --offload disk use --allocation uniform"),
])
def test_offload_refuses_what_needs_the_whole_model(capsys, tmp_path, src, calib, extra, message):
    code, _, err = cli(capsys, *prune_args(src, tmp_path / "out", calib, "--offload", "disk", *extra))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_offload_needs_a_safetensors_folder_and_the_disk_space(capsys, tmp_path, src, calib, monkeypatch):
    import slimlm.runs.offload

    code, _, err = cli(capsys, *prune_args("smollm2-135m", tmp_path / "out", calib, "--offload", "disk"))
    assert code == 2 and "local Hugging Face folder of safetensors shards" in err
    monkeypatch.setattr(slimlm.runs.offload.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    code, _, err = cli(capsys, *prune_args(src, tmp_path / "out", calib, "--offload", "disk"))
    assert code == 2 and "only 0.0 GB are free" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_in_memory_run_checkpoints_only_with_resume(capsys, tmp_path, src, calib, monkeypatch):
    from slimlm.runs.resume import Checkpoint

    restored = []
    original = Checkpoint.restore
    monkeypatch.setattr(Checkpoint, "restore", lambda self, blocks: restored.append(1) or original(self, blocks))
    assert cli(capsys, *prune_args(src, tmp_path / "plain", calib, "--method", "wanda"))[0] == 0
    assert restored == []
    assert cli(capsys, *prune_args(src, tmp_path / "resumable", calib, "--method", "wanda", "--resume"))[0] == 0
    assert restored == [1] and sorted(p.name for p in tmp_path.iterdir()) == ["plain", "resumable"]
    assert_same_weights(tmp_path / "plain", tmp_path / "resumable")
