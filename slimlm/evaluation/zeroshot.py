"""Zero-shot accuracy through lm-evaluation-harness's Python API instead of a re-implementation, so task names,
prompts and metrics are the harness's own, and numbers compare with published tables. lm_eval is an optional
extra (``pip install 'slimlm[eval]'``): it is imported only when asked for.
"""
from __future__ import annotations

import difflib
import functools
import math
import os
import time
from pathlib import Path

from slimlm.core.hub import require_hub
from slimlm.errors import SlimlmError


def zero_shot(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 1,
              device: str = "cpu", include_path: str | None = None, num_fewshot: int = 0,
              progress: bool = True) -> dict:
    """Run lm-evaluation-harness tasks on an already-loaded (pruned/quantized) model.

    The model object is wrapped as it is, not re-loaded from disk, so runtime changes that are not in
    the weights (QuaRot's online Hadamard, simulated activation quantization) are measured too.
    ``include_path`` adds a folder of task YAMLs (offline tests, private tasks); ``limit`` takes the
    first N documents of each task. ``progress=False`` turns off the harness's bars over the requests (its
    other bars open with tqdm's defaults: the CLI's --quiet turns those off). Returns
    ``{"tasks": {task: {metric: value}}, "lm_eval": version, ...}``.
    """
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    tasks = [t.strip() for t in ([tasks] if isinstance(tasks, str) else tasks) if t.strip()]
    manager = check_tasks(tasks, include_path)
    lm = HFLM(pretrained=model.to(device), tokenizer=tokenizer, batch_size=batch_size)
    if not progress:  # the request methods take disable_tqdm, which simple_evaluate does not pass on
        for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            setattr(lm, name, functools.partial(getattr(lm, name), disable_tqdm=True))
    start = time.perf_counter()
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False)
    except OSError as e:  # ConnectionError, FileNotFoundError: datasets could not fetch or read the data
        raise SlimlmError(f"lm_eval could not load the data of {', '.join(tasks)}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return {"tasks": _metrics(out), "lm_eval": lm_eval.__version__, "limit": limit,
            "num_fewshot": num_fewshot, "seconds": time.perf_counter() - start}


def _import_lm_eval():
    """lm_eval pulls in datasets, pyarrow, nltk, ... (~330 MB): only a zero-shot run should need it."""
    try:
        import lm_eval
    except ImportError as e:
        raise SlimlmError("zero-shot evaluation needs lm-evaluation-harness: "
                          "pip install 'slimlm[eval]' (or pip install lm_eval)") from e
    return lm_eval


def check_tasks(tasks: list[str], include_path: str | None = None):
    """A TaskManager that knows every name in ``tasks``, or a one-line error suggesting close names or
    saying that their data cannot be downloaded (callers run it before loading a model, to fail fast).

    Indexing the harness's ~15k built-in task YAMLs takes seconds, so a run that asks only for tasks
    in ``include_path`` uses an index of that folder alone (tests and private tasks start fast).
    """
    _import_lm_eval()
    if not tasks:
        raise SlimlmError("no zero-shot tasks given (e.g. --tasks piqa,arc_easy,hellaswag)")
    if include_path is not None and not Path(include_path).is_dir():
        raise SlimlmError(f"task folder not found: {include_path}")
    if include_path is not None:
        local = _cached_task_manager(str(include_path), False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = _cached_task_manager(None if include_path is None else str(include_path), True)
    unknown = [t for t in tasks if t not in manager.all_tasks and not _is_yaml(t)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise SlimlmError(f"unknown lm_eval task '{unknown[0]}'{hint} (all names: `lm_eval ls tasks`)")
    # the harness's own tasks read their documents from the hub
    require_hub(f"lm_eval task data ({', '.join(tasks)})",
                "use --tasks-dir with task YAMLs whose data_files are local")
    return manager


@functools.lru_cache(maxsize=4)
def _cached_task_manager(include_path: str | None, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _is_yaml(spec: str) -> bool:
    """The harness also accepts a path to a task YAML in place of a name."""
    return spec.endswith((".yaml", ".yml")) and os.path.isfile(spec)


def _metrics(out: dict) -> dict:
    """``{"acc,none": 0.5, "alias": ...}`` -> ``{"acc": 0.5}``: filter "none" dropped, NaN -> None (JSON)."""
    tables = {}
    for task, row in out["results"].items():
        metrics = {}
        for key, value in row.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # "alias", "sample_len", and the "N/A" stderr of metrics without one
            name = key[:-len(",none")] if key.endswith(",none") else key
            metrics[name] = float(value) if math.isfinite(value) else None
        samples = out.get("n-samples", {}).get(task, {}).get("effective")
        tables[task] = metrics | ({"samples": samples} if samples is not None else {})
    return tables
