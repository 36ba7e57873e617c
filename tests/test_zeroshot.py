"""Zero-shot evaluation through lm-evaluation-harness, offline: a tiny local multiple-choice task
(tests/data/zeroshot: a YAML over a JSONL) on a tiny random Llama with the built-in model's tokenizer."""
import json
import sys
from pathlib import Path

import pytest
import torch

from slimlm.errors import SlimlmError
from tests.conftest import tiny_llama

pytest.importorskip("lm_eval")

FIXTURES = Path(__file__).parent / "data" / "zeroshot"
TASK = "slimlm_tiny_mc"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub access: datasets reads HF_DATASETS_OFFLINE at import, so patch its config as well."""
    import datasets.config

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """The task YAML with its data path made absolute (datasets resolves it from the cwd, not the YAML)
    and the datasets cache in a temporary folder."""
    folder = tmp_path_factory.mktemp("tasks")
    text = (FIXTURES / f"{TASK}.yaml").read_text()
    relative = f"tests/data/zeroshot/{TASK}.jsonl"
    assert relative in text
    text = text.replace(relative, str(FIXTURES / f"{TASK}.jsonl")).replace(
        "dataset_kwargs:\n", f"dataset_kwargs:\n  cache_dir: {folder / 'hf-cache'}\n")
    (folder / f"{TASK}.yaml").write_text(text)
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from slimlm.core.cache import gguf_to_folder
    from slimlm.core.models import builtin_gguf

    return AutoTokenizer.from_pretrained(gguf_to_folder(builtin_gguf("smollm2-135m")))


def docs() -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{TASK}.jsonl").read_text().splitlines() if line]


@torch.no_grad()
def reference_accuracy(model, tokenizer, items) -> tuple[float, float]:
    """acc / acc_norm computed directly: each choice scored by the summed log-probabilities of its tokens
    after "Question: ...\\nAnswer:" (choice preceded by a space), argmax against the gold label;
    acc_norm divides by the choice's length in characters."""
    acc = acc_norm = 0
    for doc in items:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = []
        for choice in doc["choices"]:
            ctx, full = tokenizer.encode(context), tokenizer.encode(f"{context} {choice}")
            assert full[:len(ctx)] == ctx and len(full) > len(ctx)
            logp = model(input_ids=torch.tensor([full])).logits[0].float().log_softmax(-1)
            scores.append(sum(logp[i - 1, full[i]].item() for i in range(len(ctx), len(full))))
        lengths = [len(c) for c in doc["choices"]]
        acc += max(range(len(scores)), key=lambda i: scores[i]) == doc["label"]
        acc_norm += max(range(len(scores)), key=lambda i: scores[i] / lengths[i]) == doc["label"]
    return acc / len(items), acc_norm / len(items)


def test_local_task_matches_direct_loglikelihoods(tokenizer, tasks_dir):
    from slimlm.evaluation.zeroshot import zero_shot

    model = tiny_llama(vocab=49152)
    result = zero_shot(model, tokenizer, [TASK], include_path=str(tasks_dir))
    metrics = result["tasks"][TASK]
    assert 0.0 <= metrics["acc"] <= 1.0 and metrics["samples"] == len(docs())
    assert result["lm_eval"] and json.loads(json.dumps(result)) == result  # JSON-able
    assert (metrics["acc"], metrics["acc_norm"]) == pytest.approx(reference_accuracy(model, tokenizer, docs()))
    limited = zero_shot(model, tokenizer, [TASK], limit=5, include_path=str(tasks_dir))["tasks"][TASK]
    assert limited["samples"] == 5  # limit keeps the first N documents
    assert (limited["acc"], limited["acc_norm"]) == pytest.approx(reference_accuracy(model, tokenizer, docs()[:5]))


def test_unknown_task_is_one_line_with_close_names(tokenizer):
    from slimlm.evaluation.zeroshot import zero_shot

    with pytest.raises(SlimlmError, match=r"unknown lm_eval task 'arc_eazy'.*arc_easy") as e:
        zero_shot(tiny_llama(vocab=49152), tokenizer, ["arc_eazy"])
    assert len(str(e.value).splitlines()) == 1


def test_harness_tasks_need_the_hub_and_local_ones_do_not(monkeypatch, tasks_dir):
    from slimlm.core import hub
    from slimlm.evaluation.zeroshot import check_tasks

    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "can_connect", lambda host, port: False)
    check_tasks([TASK], str(tasks_dir))  # its data_files are local: no hub needed
    with pytest.raises(SlimlmError, match=r"lm_eval task data \(arc_easy\) needs the Hugging Face hub.*--tasks-dir"):
        check_tasks(["arc_easy"])


def test_missing_harness_names_the_pip_command(monkeypatch):
    from slimlm.evaluation.zeroshot import zero_shot

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(SlimlmError, match=r"pip install 'slimlm\[eval\]'"):
        zero_shot(tiny_llama(), None, [TASK])


def test_cli_writes_zero_shot_into_the_run_manifest(capsys, tmp_path, tokenizer, tasks_dir):
    from slimlm.cli import main

    run = tmp_path / "run"
    tiny_llama(vocab=49152).save_pretrained(run)
    tokenizer.save_pretrained(run)
    manifest = {"method": "magnitude", "metrics": {"perplexity": {"perplexity": 9.0}}}
    (run / "slimlm.json").write_text(json.dumps(manifest))
    capsys.readouterr()  # drop what saving the run printed
    code = main(["eval", str(run), "--tasks", TASK, "--tasks-dir", str(tasks_dir), "--limit", "4", "--record",
                 "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "%|" not in err  # --quiet: none of the harness's progress bars
    manifest = json.loads((run / "slimlm.json").read_text())
    zero_shot = manifest["metrics"]["zero_shot"]
    assert 0.0 <= zero_shot["tasks"][TASK]["acc"] <= 1.0 and zero_shot["tasks"][TASK]["samples"] == 4
    assert zero_shot["limit"] == 4 and zero_shot["lm_eval"]
    assert manifest["metrics"]["perplexity"] == {"perplexity": 9.0}  # perplexity not rerun, kept
    assert json.loads(out.strip().splitlines()[-1])["zero_shot"] == zero_shot["tasks"]

    code = main(["eval", str(run), "--tasks", "arc_eazy", "--quiet"])  # the harness index, built above
    _, err = capsys.readouterr()
    assert code == 2 and "unknown lm_eval task" in err and len(err.strip().splitlines()) == 1
    assert json.loads((run / "slimlm.json").read_text()) == manifest
