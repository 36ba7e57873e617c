"""``slimlm sweep``: a grid of runs (method × sparsity × allocation × seed), every cell a Ray task.

Each cell is a recipe (a prune step and an eval step) that runs as ``slimlm run`` would, in a Ray worker: its run
folder ``OUT/<cell>`` (weights, ``slimlm.json``, ``recipe.yaml``) is written atomically when it finishes, so a
rerun skips every cell whose folder is complete and runs the rest. At the end ``OUT/sweep.json`` holds one row per
cell (from its manifest) and ``OUT/sweep.png`` plots perplexity against sparsity.

Ray: a local Ray started for the sweep by default (``address=None``), the running cluster (``"auto"``), or a
cluster's address (``HOST:PORT`` or ``ray://HOST:PORT``), which is checked for a listening port first, so that an
unreachable address fails in seconds. A cell asks for ``cpus`` CPUs and ``gpus`` GPUs; Ray runs as many cells at
once as the cluster's resources allow.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import replace
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from slimlm.allocate import holdout
from slimlm.core.files import MANIFEST
from slimlm.errors import SlimlmError, read_json
from slimlm.recipe import Recipe, RunOptions, dumps, loads, relocated
from slimlm.runs.save import RECIPE

log = logging.getLogger(__name__)

RESULTS = "sweep.json"
CONNECT_TIMEOUT_S = 5.0


def cell_name(method: str, sparsity: float, allocation: str, seed: int) -> str:
    return f"{method}-{sparsity:g}-{allocation}-seed{seed}"


def grid(run: dict, prune: dict, evaluation: dict, methods, sparsities, allocations, seeds) -> dict[str, Recipe]:
    """Cell name -> recipe: the ``prune`` settings (recipe keys) with each method, sparsity, allocation and seed,
    then the ``evaluation`` step, on the ``run`` settings (model, dtype, device, data-dir)."""
    cells = {}
    for method in methods:
        for sparsity in sparsities:
            for allocation in allocations:
                for seed in seeds:
                    step = {**prune, "method": method, "sparsity": sparsity, "allocation": allocation, "seed": seed}
                    text = yaml.safe_dump({**run, "steps": [{"prune": step}, {"eval": evaluation}]}, sort_keys=False)
                    cells[cell_name(method, sparsity, allocation, seed)] = loads(text, "sweep cell")
    return cells


def connect(address: str | None) -> None:
    """Start (``None``) or join (``"auto"``, an address) a Ray cluster; one clear error when that fails."""
    try:
        import ray
    except ImportError:
        raise SlimlmError("slimlm sweep runs its cells on Ray, which is not installed: pip install 'slimlm[ray]'") \
            from None
    if address not in (None, "auto"):
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as e:
            raise SlimlmError(f"cannot reach the Ray cluster at {address} ({e}); give HOST:PORT of a running "
                              "cluster, auto, or nothing for a local Ray") from None
    if address is None:  # Ray lowers its workers' priority (niceness 15): on a shared machine that starves cells
        os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        local = {"num_cpus": None, "object_store_memory": 256 * 2 ** 20} if address is None else {}
        ray.init(address=address, log_to_driver=False, include_dashboard=False, configure_logging=False, **local)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SlimlmError(f"cannot connect to Ray ({address or 'local'}): {str(e).splitlines()[0]}") from None


def _run_cell(text: str, options: RunOptions) -> dict:
    """One cell, in a Ray worker: the recipe as ``slimlm run`` runs it (its folder is its recipe's out); returns
    the run's manifest."""
    from slimlm.pipeline import execute

    (run,) = [o for o in execute(loads(text, "sweep cell"), replace(options, quiet=True)) if o.kind == "run"]
    return run.manifest


def _finished(folder: Path, text: str) -> bool:
    """Whether the cell's run folder is complete; one that holds a run of other settings is an error."""
    if not (folder / MANIFEST).is_file():
        return False
    saved = folder / RECIPE
    if not saved.is_file() or saved.read_text() != text:
        raise SlimlmError(f"{folder} holds a run with other settings than this sweep's cell; delete it or sweep "
                          "into another --out")
    return True


def cell_row(name: str, folder: Path, manifest: dict | None = None) -> dict:
    """A finished cell's row, from its manifest (read from the folder for a cell finished by an earlier sweep)."""
    manifest = manifest or read_json(folder / MANIFEST)
    return {"cell": name, "folder": str(folder), "method": manifest["method"],
            "target": manifest["sparsity_target"], "sparsity": manifest["sparsity"],
            "allocation": manifest["allocation"]["name"], "seed": manifest["seed"],
            "perplexity": manifest["metrics"]["perplexity"]["perplexity"],
            "seconds": manifest["timings"]["total"], "allocation_seconds": manifest["timings"].get("allocation", 0.0),
            **holdout.summary(manifest["allocation"].get("check"))}


def sweep(cells: dict[str, Recipe], out: str | Path, address: str | None = None, cpus: float = 1, gpus: float = 0,
          progress: bool = True, options: RunOptions | None = None) -> list[dict]:
    """Run every cell not finished yet under ``out`` as a Ray task; write ``sweep.json`` and the plot; return the
    rows. Cells that fail are reported (the others still run and are written) and make it raise at the end.
    ``options``: how each cell loads its model (``allow_pickle``, ``no_cache``)."""
    options = options or RunOptions()
    out = Path(out)
    texts = {name: dumps(relocated(recipe, str(out / name))) for name, recipe in cells.items()}
    todo = [name for name in cells if not _finished(out / name, texts[name])]
    log.info("sweep: %d cells, %d finished before, %d to run", len(cells), len(cells) - len(todo), len(todo))
    failed, manifests = {}, {}
    if todo:
        connect(address)  # first: it says how to install Ray where it is missing
        import ray

        task = ray.remote(_run_cell).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
        pending = {task.remote(texts[name], options): name for name in todo}
        bar, start = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="cells", disable=not progress), \
            time.perf_counter()
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ref)
            try:
                manifests[name] = ray.get(ref)
                log.info("cell %s done (%.0f s into the sweep)", name, time.perf_counter() - start)
            except ray.exceptions.RayError as e:
                failed[name] = str(getattr(e, "cause", None) or e).splitlines()[0]
                log.error("cell %s failed: %s", name, failed[name])
            bar.update()
        bar.close()
        if address is None:
            ray.shutdown()  # the local Ray started for this sweep
    rows = [cell_row(name, out / name, manifests.get(name)) for name in cells if name not in failed]
    write(rows, out)
    if failed:
        reasons = "; ".join(f"{name}: {message}" for name, message in failed.items())
        raise SlimlmError(f"{len(failed)} of {len(cells)} cells failed ({reasons}); the others are in sweep.json, "
                          "and a rerun runs only the missing cells")
    return rows


def write(rows: list[dict], out: Path) -> None:
    """``sweep.json`` (every row) and ``sweep.png`` (perplexity against sparsity) in ``out``."""
    from slimlm.report import plots

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RESULTS}.tmp"
    tmp.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    tmp.replace(out / RESULTS)
    if rows:
        plots.sweep([{**r, "sparsity": r["target"]} for r in rows], out / "sweep.png")
