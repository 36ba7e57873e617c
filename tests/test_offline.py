"""Offline behaviour and side effects: an unreachable hub fails at once with one line, a typo of the built-in
alias is named, `eval` leaves a run folder alone unless asked to record, the GGUF conversion cache can be
listed and cleared, and every file slimlm writes follows the umask."""
import json
import os
import socket
import stat
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch

import slimlm
from slimlm.cli import main
from slimlm.cli.commands import readable
from slimlm.core import hub
from slimlm.errors import SlimlmError
from tests.conftest import tiny_llama

VOCAB = 320  # rows of the tiny models' embeddings: the tiny tokenizer's 283 tokens fit


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_hub(monkeypatch):
    """The hub unreachable, and no offline mode asked for: every download must be refused by the probe."""
    for name in hub.OFFLINE_VARIABLES + ("SLIMLM_DATA_DIR",):
        monkeypatch.delenv(name, raising=False)
    probes = []
    monkeypatch.setattr(hub, "can_connect", lambda host, port: probes.append((host, port)) or False)
    return probes


@pytest.fixture
def not_loaded(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the failing check")
    monkeypatch.setattr(slimlm, "load_model", refuse)


# ---------------------------------------------------------------- the probe

def test_probe_connects_to_a_listening_port_and_not_to_a_closed_one(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert hub.can_connect("127.0.0.1", port)
    start = time.perf_counter()
    assert not hub.can_connect("127.0.0.1", port, timeout=1.0)  # closed now: refused at once
    assert not hub.can_connect("no-such-host.invalid", 443, timeout=1.0)
    assert time.perf_counter() - start < 2.5


def test_probe_address_follows_endpoint_and_proxy(monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert hub.hub_address() == ("huggingface.co", 443)
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080")
    assert hub.hub_address() == ("mirror.example", 8080)
    monkeypatch.setenv("HTTPS_PROXY", "proxy.example:3128")
    assert hub.hub_address() == ("proxy.example", 3128)


def test_offline_mode_skips_the_probe(monkeypatch, no_hub):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.require_hub("x", "y")  # the libraries then read their caches only: nothing to refuse
    assert no_hub == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(SlimlmError, match="cannot be reached.*; offline, y, or set HF_HUB_OFFLINE=1"):
        hub.require_hub("x", "y")
    assert len(no_hub) == 1


# ---------------------------------------------------------------- failing fast

def test_eval_without_data_dir_fails_at_once_saying_what_to_do(capsys, no_hub, not_loaded):
    start = time.perf_counter()
    code, out, err = run(capsys, "eval", "smollm2-135m", "--eval-windows", "1")
    assert time.perf_counter() - start < 2.0
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("slimlm: error: dataset wikitext2 needs the Hugging Face hub")
    assert "--data-dir" in err and "SLIMLM_DATA_DIR" in err
    code, _, err = run(capsys, "eval", "smollm2-135m", "--eval-dataset", "c4", "--data-dir", "/")
    assert code == 2 and "dataset c4 needs the Hugging Face hub" in err and "local text file" in err


def test_hub_model_offline_fails_at_once(capsys, no_hub, not_loaded):
    start = time.perf_counter()
    code, _, err = run(capsys, "eval", "SomeOrg/some-model", "--data-dir", "/")
    assert time.perf_counter() - start < 2.0 and code == 2 and len(err.strip().splitlines()) == 1
    assert "model 'SomeOrg/some-model'" in err and "local model folder" in err and no_hub
    with pytest.raises(SlimlmError, match="cannot be reached"):  # the Python API too, not only the CLI
        from slimlm.core.models import load_model
        load_model("SomeOrg/some-model")


@pytest.mark.parametrize("name", ["smollm2-135", "smolm2-135m", "SmolLM2-135M"])
def test_typo_of_the_builtin_alias_is_named_before_any_network(capsys, name, no_hub, not_loaded):
    code, _, err = run(capsys, "eval", name, "--data-dir", "/")
    assert code == 2 and err.strip() == (f"slimlm: error: unknown model '{name}': did you mean smollm2-135m? "
                                         "(models are a built-in alias, a local folder, a .gguf file or a hub id)")
    assert no_hub == []  # no probe either


def test_calibration_offline_fails_without_network(tmp_path, no_hub):
    with pytest.raises(SlimlmError, match="dataset wikitext2 needs the Hugging Face hub.*--data-dir"):
        slimlm.calibration(None, "wikitext2", 2, 16)
    with pytest.raises(SlimlmError, match="dataset c4 needs the Hugging Face hub"):
        slimlm.calibration(None, "c4", 2, 16)
    text = tmp_path / "t.txt"
    text.write_text("a local text file needs no hub")
    from slimlm.core.data import check_data
    check_data(str(text))  # nothing raised, no probe
    assert len(no_hub) == 2


# ---------------------------------------------------------------- eval and the run's manifest

@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer of 283 tokens: a GGUF with the built-in model's 49k-token vocabulary takes
    over a minute to read back on the shared CPUs, this one a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["offline runs leave the cache alone"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"],
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizer):
    model = tiny_llama(vocab=VOCAB)
    return slimlm.save(model, tokenizer, tmp_path_factory.mktemp("runs") / "run",
                       slimlm.prune(model, method="magnitude", sparsity=0.5))


def snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_eval_leaves_the_run_alone_unless_asked_to_record(capsys, tmp_path, tiny_run):
    text = tmp_path / "eval.txt"
    text.write_text("offline runs leave the cache alone; " * 20)
    before = snapshot(tiny_run)
    args = ["eval", tiny_run, "--eval-dataset", text, "--eval-seqlen", "64", "--eval-windows", "1", "--quiet"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert snapshot(tiny_run) == before
    code, out, err = run(capsys, *args, "--record")
    assert code == 0, err
    manifest = json.loads((tiny_run / "slimlm.json").read_text())
    assert readable(manifest["metrics"]["perplexity"]["perplexity"]) == json.loads(out)["perplexity"]
    assert {k: v for k, v in manifest.items() if k != "metrics"} == json.loads(before["slimlm.json"][0])
    assert snapshot(tiny_run).keys() == before.keys()  # no temporary file left


def test_record_needs_a_run_folder(capsys, tmp_path, no_hub, not_loaded):
    code, _, err = run(capsys, "eval", "smollm2-135m", "--record", "--data-dir", "/")
    assert code == 2 and "--record writes into a run folder's slimlm.json" in err


# ---------------------------------------------------------------- the conversion cache

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_run) -> Path:
    from slimlm.gguf.export import export_gguf

    return export_gguf(tiny_run, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(16).view(1, 16)).logits


def test_gguf_copy_is_announced_listed_and_cleared(capsys, monkeypatch, cache, tiny_gguf):
    from slimlm.core import models
    from slimlm.core.models import load_model

    model, _ = load_model(str(tiny_gguf))
    [entry] = [p for p in cache.iterdir() if p.is_dir()]
    size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
    err = capsys.readouterr().err
    assert f"kept a float32 copy of tiny.gguf in {entry} ({size / 1e6:.1f} MB;" in err
    os.utime(entry / "slimlm-cache.json", (0, 0))
    again, _ = load_model(str(tiny_gguf))
    assert "kept a float32 copy" not in capsys.readouterr().err  # announced once, when made
    assert (entry / "slimlm-cache.json").stat().st_mtime > 0  # last use moved
    assert torch.equal(logits(model), logits(again))

    (cache / "notes").mkdir()  # not ours: never listed or removed
    code, out, _ = run(capsys, "cache", "list")
    row, total = out.splitlines()
    head, used, source = row.split("  ")[:2], row.split("  ")[2], row.split("  ")[3]
    assert code == 0 and head == [str(entry), f"{size / 1e6:.1f} MB"] and source == f"from {tiny_gguf.resolve()}"
    assert abs(datetime.strptime(used, "last used %Y-%m-%d %H:%M") - datetime.now()) < timedelta(minutes=2)
    assert total == f"1 entry, {size / 1e6:.1f} MB in {cache}"

    code, _, err = run(capsys, "cache", "clear", "nope")
    assert code == 2 and "no cache entry 'nope'" in err and entry.is_dir()
    code, _, err = run(capsys, "cache", "clear")
    assert code == 2 and "--all" in err and entry.is_dir()
    code, out, _ = run(capsys, "cache", "clear", tiny_gguf)  # by source file
    assert code == 0 and f"removed {entry}" in out and not entry.exists()
    load_model(str(tiny_gguf))
    (entry / "slimlm-cache.json").unlink()  # as an older slimlm left its copies
    code, out, _ = run(capsys, "cache", "list")
    assert "from a GGUF file not recorded" in out
    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny-alias", None)
    monkeypatch.setattr(models, "builtin_gguf", lambda alias: tiny_gguf)
    code, out, _ = run(capsys, "cache", "clear", "tiny-alias")  # by built-in alias
    assert code == 0 and f"removed {entry}" in out and not entry.exists()
    load_model(str(tiny_gguf))
    (cache / ".tmp-killed").mkdir()
    code, out, _ = run(capsys, "cache", "clear", "--all")
    assert code == 0 and out.count("removed") == 2
    assert [p.name for p in cache.iterdir()] == ["notes"]


def test_one_copy_for_the_same_file_anywhere(cache, tiny_gguf, tmp_path):
    """Another environment's copy of the same GGUF (another path, another mtime) finds the same float32 copy."""
    import shutil

    from slimlm.core.cache import entry_name, gguf_to_folder

    elsewhere = tmp_path / "other-venv" / "tiny.gguf"
    elsewhere.parent.mkdir()
    shutil.copyfile(tiny_gguf, elsewhere)
    assert elsewhere.stat().st_mtime_ns != tiny_gguf.stat().st_mtime_ns
    assert gguf_to_folder(elsewhere) == gguf_to_folder(tiny_gguf) == cache / entry_name(tiny_gguf)
    changed = tmp_path / "tiny.gguf"
    changed.write_bytes(tiny_gguf.read_bytes()[:-1] + b"\x01")  # other content: another entry
    assert entry_name(changed) != entry_name(tiny_gguf)


def test_no_cache_dequantizes_in_memory(capsys, cache, tiny_gguf):
    from slimlm.core.models import load_model

    model, _ = load_model(str(tiny_gguf), cache=False)
    assert not cache.exists()
    cached, _ = load_model(str(tiny_gguf))
    assert torch.equal(logits(model), logits(cached))
    bf16, _ = load_model(str(tiny_gguf), "bfloat16", cache=False)
    assert bf16.dtype == torch.bfloat16


# ---------------------------------------------------------------- file modes

@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def modes(root: Path) -> set[tuple[str, int]]:
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in paths}


def test_every_written_file_follows_the_umask(tmp_path, umask_027, tiny_run, tokenizer, tiny_gguf, cache):
    from slimlm.gguf.export import export_gguf
    from slimlm.formats.sparse import export_sparse

    model = tiny_llama(vocab=VOCAB)
    saved = slimlm.save(model, tokenizer, tmp_path / "run", slimlm.prune(model, method="magnitude", pattern="2:4"))
    assert modes(saved) == {("dir", 0o750), ("file", 0o640)}
    assert modes(export_sparse(saved, tmp_path / "sparse")) == {("dir", 0o750), ("file", 0o640)}
    assert modes(export_gguf(saved, tmp_path / "m.gguf")) == {("file", 0o640)}
    from slimlm.core.cache import gguf_to_folder
    assert modes(gguf_to_folder(tiny_gguf)) == {("dir", 0o750), ("file", 0o640)}
