"""Resumable runs: per-block checkpoints in a hidden partial folder beside the output.

A calibrated run with ``--resume`` (and every ``--offload disk`` run) works in ``.NAME.partial`` next to
its output ``NAME``. After block i the engine writes, each file through a temporary name and an atomic rename:

  block-i.safetensors  the block's compressed weights (left out when the blocks stream to output shards:
                       the shard written for block i is then its checkpoint)
  acts-i.safetensors   block i+1's inputs and the tensors the compress callback kept so far (N:M permutations)
  progress.json        last: the number of finished blocks, the run's settings, the callback's records

A run killed at any point restarts after its last finished block from exactly the state an uninterrupted
run had there, so its weights come out bit-identical. The partial folder never holds ``slimlm.json`` or
``config.json``; it is renamed to ``NAME`` (or replaced by the saved run) only when everything is written.
It is kept when a run fails or is killed, so that ``--resume`` can continue it.

Under torchrun (``core.distributed``) every rank writes its own share of the next block's inputs
(``acts-i-rank-R-of-N.safetensors``), rank 0 the weights; only when every rank has written does rank 0 advance
``progress.json``, so a run in which any rank died resumes, with the same number of processes, from the last
block that all of them finished.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slimlm.core import distributed
from slimlm.errors import SlimlmError, read_json

PROGRESS = "progress.json"
ACTIVATIONS = "activations"  # key of the next block's inputs inside acts-i.safetensors


def partial_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def write_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written under a temporary name and renamed, so it is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_progress(folder: Path, settings: dict) -> dict | None:
    """The saved progress of an interrupted run in ``folder`` (None if there is none); a run started with
    other settings is refused, since continuing it would mix two different runs."""
    path = Path(folder) / PROGRESS
    if not path.is_file():
        return None
    progress = read_json(path, f"; delete {folder} to start again")
    saved, now = progress["settings"], json.loads(json.dumps(settings))
    if saved != now:
        changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:3])
        raise SlimlmError(f"the interrupted run in {folder} used other settings ({diffs}); "
                          f"rerun it with the same options, or delete {folder}")
    return progress


def clear_checkpoint(folder: Path) -> None:
    """Remove the checkpoint files from a finished partial folder (the streamed output shards stay)."""
    for path in [folder / PROGRESS, *folder.glob("acts-*.safetensors"), *folder.glob("block-*.safetensors")]:
        path.unlink(missing_ok=True)


@dataclass
class Checkpoint:
    """The per-block checkpoint of one run. ``records`` (JSON-able) and ``tensors`` are the compress
    callback's own per-layer results: it writes into them, they are saved with each block and refilled
    on resume. ``weights=False`` when the blocks' weights are saved elsewhere (streamed output shards)."""

    folder: Path
    settings: dict
    weights: bool = True
    records: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # the processes before this one that worked on the run: {"from_block", "seconds"} each (see ``processes``)
    earlier: list[dict] = field(default_factory=list)
    first_block: int = 0  # where this process started
    started: float = field(default_factory=time.perf_counter)

    def processes(self) -> list[dict]:
        """Every process that worked on this run so far, this one last: where each started, how long it ran."""
        return [*self.earlier, {"from_block": self.first_block, "seconds": time.perf_counter() - self.started}]

    def _file(self, kind: str, i: int) -> Path:
        shared = kind == "block" or distributed.world() == 1  # else each rank's own share of the activations
        ranks = "" if shared else f"-rank-{distributed.rank()}-of-{distributed.world()}"
        return self.folder / f"{kind}-{i:05d}{ranks}.safetensors"

    def restore(self, blocks) -> tuple[int, torch.Tensor | None]:
        """Start or continue the run: ``(finished blocks, next block's inputs or None)``; the finished
        blocks' weights are loaded back into ``blocks`` (when this checkpoint holds them)."""
        distributed.barrier()  # every rank reads the progress before rank 0 may start the folder afresh
        progress = read_progress(self.folder, self.settings)
        distributed.barrier()
        if progress is None:  # a fresh run (or one killed before its first checkpoint): start clean
            if distributed.is_main():
                shutil.rmtree(self.folder, ignore_errors=True)
                self.folder.mkdir(parents=True)
                self._write_progress(0)
            distributed.barrier()
            return 0, None
        if progress.get("world_size", 1) != distributed.world():
            raise SlimlmError(f"the interrupted run in {self.folder} ran on {progress.get('world_size', 1)} "
                              f"process(es), this one on {distributed.world()}; resume it with the same number, "
                              f"or delete {self.folder}")
        done = progress["done"]
        self.records.update(progress["records"])
        self.earlier, self.first_block = progress.get("processes", []), done
        if done == 0:
            return 0, None
        saved = load_file(self._file("acts", done - 1))
        activations = saved.pop(ACTIVATIONS, None)
        self.tensors.update(saved)
        if self.weights:
            for i in range(done):
                blocks[i].load_state_dict(load_file(self._file("block", i)))
        return done, activations

    def save(self, i: int, block, activations: torch.Tensor | None) -> None:
        """Checkpoint finished block ``i``; ``activations`` are block i+1's inputs (None for data-free runs)."""
        if self.weights and distributed.is_main():
            write_tensors(block.state_dict(), self._file("block", i))
        extra = {} if activations is None else {ACTIVATIONS: activations.cpu()}
        write_tensors(self.tensors | extra, self._file("acts", i))
        distributed.barrier()  # every rank's share is on disk
        if distributed.is_main():
            self._write_progress(i + 1)  # only now does block i count as finished
            for old in self.folder.glob(f"acts-{i - 1:05d}*.safetensors") if i else ():
                old.unlink(missing_ok=True)

    def _write_progress(self, done: int) -> None:
        _write_json({"done": done, "settings": self.settings, "records": self.records,
                     "world_size": distributed.world(), "processes": self.processes()}, self.folder / PROGRESS)
