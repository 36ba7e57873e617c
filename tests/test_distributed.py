"""Data-parallel calibration under torchrun (core.distributed): 2 gloo processes against 1, resume after a rank
died, and ranks started differently.

References: the same command in one process (data-free methods: bit-identical, as no statistic is reduced;
calibrated ones: within the tolerance that core.distributed states, since each rank's float32 partial sums are
added in float64), and the same 2-process command run uninterrupted (bit-identical: the reduction order is fixed).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from slimlm.cli import main
from tests.conftest import REPO, tiny_llama

# torchrun runs this instead of `-m slimlm` when a test needs a rank to misbehave: SLIMLM_TEST_RANK picks the rank,
# SLIMLM_TEST_DO what it does: "die:I" kills it (SIGKILL-like, no cleanup) right after it checkpointed block I,
# "seed" starts it with another seed than the others.
MISBEHAVE = """
import os, sys
from slimlm.cli import main
from slimlm.runs import resume
if os.environ["RANK"] == os.environ["SLIMLM_TEST_RANK"]:
    what = os.environ["SLIMLM_TEST_DO"]
    if what.startswith("die:"):
        after, save = int(what[4:]), resume.Checkpoint.save
        def save_then_die(self, i, *args):
            save(self, i, *args)
            if i == after:
                os._exit(9)
        resume.Checkpoint.save = save_then_die
    elif what == "seed":
        sys.argv += ["--seed", "7"]
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from transformers import AutoTokenizer

    from slimlm.core.cache import gguf_to_folder
    from slimlm.core.models import builtin_gguf

    folder = tmp_path_factory.mktemp("src")
    tiny_llama(layers=4, vocab=49152).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf_to_folder(builtin_gguf("smollm2-135m"))).save_pretrained(folder)
    return folder


def torchrun(tmp_path, argv: list[str], script: str | None = None, **env) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2`` of the CLI (or of ``script``) with ``argv``."""
    target = ["-m", "slimlm"]
    if script is not None:
        (tmp_path / "misbehave.py").write_text(script)
        target = [str(tmp_path / "misbehave.py")]
    environment = dict(os.environ, PYTHONPATH=str(REPO), SLIMLM_DIST_TIMEOUT="60", **env)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *target, *argv], capture_output=True, text=True, env=environment, timeout=600)


def run_args(command, src, out, calib, *extra):
    return [*command[:1], str(src), *command[1:], "--out", str(out), "--calib", calib, "--nsamples", "8",
            "--seqlen", "32", "--batch-size", "2", "--quiet", *extra]


def weights(folder) -> dict[str, torch.Tensor]:
    return {k: v for shard in sorted(folder.glob("model*.safetensors")) for k, v in load_file(shard).items()}


def manifest(folder) -> dict:
    return json.loads((folder / "slimlm.json").read_text())


@pytest.mark.parametrize("command", [
    ["quantize", "--method", "rtn", "--wbits", "4"],  # data-free: each rank rounds half the linears
    ["prune", "--method", "wanda", "--sparsity", "0.5", "--offload", "disk"],
    ["prune", "--method", "sparsegpt", "--sparsity", "0.5"],
    ["quantize", "--method", "gptq", "--wbits", "4", "--group-size", "32"],
])
def test_two_processes_equal_one(capsys, tmp_path, src, calib, command):
    """Bit for bit: statistics are float64 sums of per-window float32 products, rounded once (core.stats), so
    neither the split over ranks nor the batch size changes them, and the methods see the same Hessians."""
    assert main(run_args(command, src, tmp_path / "one", calib)) == 0
    done = torchrun(tmp_path, run_args(command, src, tmp_path / "two", calib))
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(run_args(command, src, tmp_path / "batch", calib, "--batch-size", "3")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch", "one", "two"]  # rank 0 wrote one folder
    one, two, batch = weights(tmp_path / "one"), weights(tmp_path / "two"), weights(tmp_path / "batch")
    assert one.keys() == two.keys() == batch.keys()
    assert all(torch.equal(one[k], two[k]) and torch.equal(one[k], batch[k]) for k in one)
    m1, m2 = manifest(tmp_path / "one"), manifest(tmp_path / "two")
    assert (m1["world_size"], m2["world_size"], m2["backend"]) == (1, 2, "gloo")
    assert {k for k in m1.keys() | m2.keys() if m1.get(k) != m2.get(k)} <= {"timings", "world_size", "backend"}


def test_killed_rank_resumes_to_identical_weights(tmp_path, src, calib):
    command = ["prune", "--method", "sparsegpt", "--sparsity", "0.5"]
    reference = torchrun(tmp_path, run_args(command, src, tmp_path / "reference", calib))
    assert reference.returncode == 0, reference.stderr[-3000:]
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    died = torchrun(tmp_path, run_args(command, src, out, calib, "--resume"), MISBEHAVE,
                    SLIMLM_TEST_RANK="1", SLIMLM_TEST_DO="die:1")
    assert died.returncode != 0 and not out.exists()
    done = json.loads((partial / "progress.json").read_text())["done"]
    assert done in (1, 2)  # rank 1 died after its block-1 share: rank 0 may or may not have recorded block 1

    code = main(run_args(command, src, out, calib, "--resume"))  # one process cannot continue a 2-process run
    assert code == 2 and partial.is_dir() and not out.exists()
    resumed = torchrun(tmp_path, run_args(command, src, out, calib, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not partial.exists()
    a, b = weights(out), weights(tmp_path / "reference")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert manifest(out)["layers"] == manifest(tmp_path / "reference")["layers"]


def test_ranks_started_differently_are_refused(tmp_path, src, calib):
    command = ["prune", "--method", "wanda"]
    done = torchrun(tmp_path, run_args(command, src, tmp_path / "out", calib), MISBEHAVE,
                    SLIMLM_TEST_RANK="1", SLIMLM_TEST_DO="seed")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("slimlm: error:")]
    assert errors and all("rank 1 was started with other options than rank 0" in e for e in errors), done.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "misbehave.py"]  # nothing written


def test_too_few_windows_for_the_ranks(tmp_path, src, calib):
    done = torchrun(tmp_path, run_args(["prune", "--method", "wanda"], src, tmp_path / "out", calib, "--nsamples", "1"))
    assert done.returncode != 0
    assert "1 calibration windows cannot be shared by 2 processes; raise --nsamples" in done.stderr
    assert not (tmp_path / "out").exists()
