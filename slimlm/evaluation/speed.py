"""Measured inference speed of models beside a baseline measured in the same invocation.

A speed-up claimed for a pruned or quantized model means something only against the dense model measured on the
same machine at the same time. So ``measure_speed`` takes the baseline first and the models to compare after it,
and runs them in turns, A B A B ... for ``repeats`` rounds: noise on a shared machine then hits every model alike.
It reports medians over the rounds and each model's ratios to the baseline.

Engines:
  * ``transformers``: every (model, round) runs in a fresh ``python -m slimlm.evaluation.speed`` process that loads
    the model with ``slimlm.load_model``, warms up, times greedy KV-cache decoding of random token prompts at each
    batch size and prints one JSON line. Only one model is in memory at a time, and a process's peak memory is
    that one model's.
  * ``llama.cpp``: ``llama-bench`` on ``.gguf`` files: pp (the prompt in one batch) and tg (one sequence decoding
    token by token); decode at batch > 1 from ``llama-batched-bench`` (that many sequences, each its own prompt,
    decoding together: its speed_tg is their tokens per second, as the transformers figure is).
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from slimlm.errors import SlimlmError, unknown

log = logging.getLogger(__name__)

ENGINES = ("transformers", "llama.cpp")
SEED = 0
RATIO_KEYS = ("params", "nonzero_params", "size_bytes", "prefill_tok_s", "ttft_s", "peak_rss_bytes",
              "peak_cuda_bytes")
TTFT_DERIVED = "derived: prompt_tokens / prefill_tok_s + 1 / decode_tok_s at batch 1 (llama-bench times them apart)"
# Runs argv[1:] and prints its exit status, output and peak RSS as one JSON line. RUSAGE_CHILDREN of this small
# process covers that one child only (see _run_with_peak).
PEAK_WRAPPER = ("import json, resource, subprocess, sys\n"
                "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
                "print(json.dumps({'rc': done.returncode, 'out': done.stdout, 'err': done.stderr,\n"
                "                  'maxrss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")


def measure_speed(models: list[str], engine: str = "transformers", prompt_tokens: int = 128, new_tokens: int = 32,
                  batches=(1, 8), repeats: int = 3, threads: int = 2, device: str = "cpu", dtype: str = "float32",
                  progress: bool = True) -> dict:
    """Speed of each of ``models``, the first being the baseline, measured in alternating rounds (module docstring).

    Returns ``{'settings': {...}, 'baseline': models[0], 'models': [entry, ...]}``; an entry holds the medians of
    prefill_tok_s (batch 1), ttft_s (batch 1) and decode_tok_s (by batch size, as a string), the peak memory, the
    size, every round's timings under 'samples', 'notes' on figures that are derived or not measured (None) and,
    after the baseline, 'ratios': entry / baseline for each number (> 1: faster tok/s, slower TTFT, more memory)
    and 'round_ranges': the lowest and highest ratio of a single round; 'warnings' says where the ratios are noise
    (one round, a loaded machine, rounds on both sides of 1). decode_tok_s at batch b is the b sequences' tokens
    per second together.
    Batch 1 is always measured: prefill and TTFT are taken there. Progress goes to the log (stderr in the CLI).
    """
    settings = {"engine": engine, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                "batches": sorted({1, *batches}), "repeats": repeats, "threads": threads, "device": device,
                "dtype": dtype, "seed": SEED}
    _check_settings(settings)
    _check_models(models, engine)
    run = _transformers_run if engine == "transformers" else _llama_bench_run
    rounds: list[list[dict]] = [[] for _ in models]  # by position: a model may be listed twice
    for r in range(repeats):
        for runs, name in zip(rounds, models):
            if progress:
                log.info("speed: %s, round %d of %d", name, r + 1, repeats)
            runs.append(run(name, settings))
    entries = [_summary(name, runs) for name, runs in zip(models, rounds)]
    for entry in entries[1:]:
        entry["ratios"], entry["round_ranges"] = _ratios(entry, entries[0]), _round_ranges(entry, entries[0])
    warnings = _noise_warnings(entries, repeats)
    for warning in warnings:
        log.warning("speed: %s", warning)
    return {"settings": settings, "baseline": models[0], "models": entries, "warnings": warnings}


def _check_settings(s: dict) -> None:
    """Bad settings fail here, in one line, before minutes of measuring."""
    from slimlm.core.models import DTYPES

    if s["engine"] not in ENGINES:
        raise unknown("engine", s["engine"], ENGINES)
    for key, low in (("prompt_tokens", 1), ("new_tokens", 2), ("repeats", 1), ("threads", 1)):
        if s[key] < low:
            raise SlimlmError(f"{key} must be at least {low}, not {s[key]}" + (
                " (the first new token comes from the prefill; decode speed is timed on the others)"
                if key == "new_tokens" else ""))
    if s["batches"][0] < 1:
        raise SlimlmError(f"batch sizes must be positive, not {s['batches'][0]}")
    if s["dtype"] not in DTYPES:
        raise unknown("dtype", s["dtype"], DTYPES)
    if s["device"] != "cpu" and not s["device"].startswith("cuda"):
        raise SlimlmError(f"unknown device {s['device']!r}; use cpu or cuda")
    if s["device"] != "cpu" and s["engine"] == "transformers" and not torch.cuda.is_available():
        raise SlimlmError(f"device {s['device']} asked for, but torch sees no CUDA device")


def _check_models(models: list[str], engine: str) -> None:
    """Missing models, and files llama.cpp cannot run, fail before the first round (not after the baseline's)."""
    from slimlm.core.models import model_source

    if not models:
        raise SlimlmError("speed needs at least one model (the first is the baseline)")
    for name in models:
        if engine == "transformers":
            model_source(name)
        elif not name.endswith(".gguf"):
            raise SlimlmError(f"the llama.cpp engine runs .gguf files; {name} is not one (write one with slimlm gguf)")
        elif not Path(name).is_file():
            raise SlimlmError(f"model file not found: {name}")


# ---- transformers: one fresh process per (model, round) ----

def _transformers_run(name: str, settings: dict) -> dict:
    """One round of one model in a fresh process; its last stdout line is the round's JSON."""
    s = settings
    cmd = [sys.executable, "-m", "slimlm.evaluation.speed", name, "--prompt-tokens", str(s["prompt_tokens"]),
           "--new-tokens", str(s["new_tokens"]), "--batches", ",".join(map(str, s["batches"])),
           "--threads", str(s["threads"]), "--device", s["device"], "--dtype", s["dtype"]]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
    if done.returncode != 0:
        raise SlimlmError(f"speed run of {name} failed (exit {done.returncode}): {_last_error(done.stderr)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child_env() -> dict:
    """The environment with this slimlm first on the path, so the child measures the code the parent runs."""
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def _last_error(stderr: str) -> str:
    """The line that says why a child failed: its slimlm error, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("slimlm: error: ") for line in lines if line.startswith("slimlm: error: ")]
    return (errors or lines or ["no output"])[-1]


def measure_in_process(name: str, prompt_tokens: int, new_tokens: int, batches: list[int], threads: int,
                       device: str = "cpu", dtype: str = "float32") -> dict:
    """One round in this process: load, warm up, time greedy decoding at each batch size (batch 1 among them).
    Meant for a fresh process, whose peak memory is then the model's."""
    from slimlm.hooks.runtime import apply_runtime
    from slimlm.core.models import load_model
    from slimlm.core.files import read_manifest

    batches = sorted({1, *batches})
    torch.set_num_threads(threads)
    model, _ = load_model(name, dtype)
    if Path(name).is_dir():  # a run's online transforms and quantizers cost time
        apply_runtime(model, read_manifest(name), name)
    model.to(device)
    sample = _size(model)
    vocab = model.get_input_embeddings().num_embeddings
    prompts = {b: prompt_ids(vocab, b, prompt_tokens).to(device) for b in batches}
    peak_from_start = not _reset_peaks(device)
    for ids in prompts.values():
        greedy(model, ids, 2, device)  # warm-up: a shape's first call pays for allocations and kernel choice
    timed = {b: greedy(model, ids, new_tokens, device)[1:] for b, ids in prompts.items()}
    prefill_s = timed[1][0]
    sample.update(prefill_tok_s=prompt_tokens / prefill_s, ttft_s=prefill_s,
                  decode_tok_s={str(b): b * (new_tokens - 1) / decode_s for b, (_, decode_s) in timed.items()},
                  **_peaks(device))
    sample["notes"] = {}
    if sample["peak_rss_bytes"] is None:
        sample["notes"]["peak_rss_bytes"] = "not measured: needs Linux's /proc/self/status"
    elif peak_from_start:
        sample["notes"]["peak_rss_bytes"] = "includes loading (could not reset the peak)"
    return sample


def _size(model) -> dict:
    """Parameter count, non-zeros (pruning keeps the shapes, so only this count shrinks) and the weights' bytes."""
    params = list(model.parameters())
    return {"params": sum(p.numel() for p in params), "nonzero_params": sum(int(p.count_nonzero()) for p in params),
            "size_bytes": sum(p.numel() * p.element_size() for p in params)}


def prompt_ids(vocab: int, batch: int, tokens: int) -> torch.Tensor:
    """Random token ids from a fixed seed: the same prompts in every round, and no text or tokenizer needed (the
    time of a forward does not depend on which tokens it reads)."""
    return torch.randint(vocab, (batch, tokens), generator=torch.Generator().manual_seed(SEED))


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new_tokens: int, device: str = "cpu") -> tuple[torch.Tensor, float, float]:
    """Greedy decoding with the KV cache: ``(new token ids (batch, new_tokens), prefill_s, decode_s)``.

    The prefill forward yields the first new token, so prefill_s is the time to first token; each of the
    new_tokens - 1 one-token steps after it (decode_s) yields one more. A plain loop rather than ``model.generate``
    so that the two phases are timed apart and no sampling machinery is timed; its tokens are generate's greedy
    ones (tested). Like generate, the prefill computes logits for the last position only, where the model allows.
    """
    from transformers import DynamicCache

    names = inspect.signature(model.forward).parameters
    keep = {"logits_to_keep": 1} if "logits_to_keep" in names else {}
    cache = {"cache" if "cache" in names else "past_key_values": DynamicCache(config=model.config)}  # 5.x renamed it
    start = _now(device)
    out = model(input_ids=ids, use_cache=True, **cache, **keep)
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    first = _now(device)
    for _ in range(new_tokens - 1):
        out = model(input_ids=tokens[-1], use_cache=True, **cache)  # the cache fills in place
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    end = _now(device)
    return torch.cat(tokens, dim=1), first - start, end - first


def _now(device: str) -> float:
    """A clock read after the device has finished its queued work (CUDA runs asynchronously)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _reset_peaks(device: str) -> bool:
    """Forget the memory peak of loading: transformers holds the file's pages and the weights at once while it
    loads, about twice the model, and that is not what running the model needs. On Linux, writing 5 to
    /proc/self/clear_refs resets VmHWM; False where that is not possible (the peak then includes loading)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peaks(device: str) -> dict:
    """This process's peak resident memory, VmHWM in /proc/self/status (None where there is none), and on CUDA
    torch's peak allocation. Not ru_maxrss: Linux starts a child's ru_maxrss at its parent's peak (fork/exec carry
    it over), which would make a small model look as big as the process that launched it."""
    try:
        status = Path("/proc/self/status").read_text()
        rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        rss = None
    return {"peak_rss_bytes": rss,
            "peak_cuda_bytes": torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None}


# ---- llama.cpp: llama-bench ----

def _llama_bench_run(path: str, settings: dict) -> dict:
    """One round of llama-bench on one file, one repetition (-r 1): the rounds are the repeats, so that they
    alternate between models. -ngl 0 keeps a GPU build on the CPU when the device is cpu."""
    from slimlm.evaluation.llama_cpp import tool

    s = settings
    args = ["-m", path, "-p", s["prompt_tokens"], "-n", s["new_tokens"], "-t", s["threads"], "-r", 1, "-o", "json",
            "-ngl", 0 if s["device"] == "cpu" else 99]
    rc, out, err, peak = _run_with_peak([str(tool("llama-bench")), *map(str, args)])
    if rc != 0:
        raise SlimlmError(f"llama.cpp llama-bench failed on {path} (exit {rc}): {_last_error(err)}")
    pp, tg = _bench_results(out, path)
    if s["device"] != "cpu" and "CUDA" not in pp.get("backends", ""):
        raise SlimlmError(f"this llama.cpp build runs on {pp.get('backends')}, not {s['device']}")
    batched, batched_peak = _batched_decode(path, s, [b for b in s["batches"] if b != 1])
    notes = {"ttft_s": TTFT_DERIVED}
    if s["device"] != "cpu":
        notes["peak_cuda_bytes"] = "not measured: llama-bench does not report device memory"
    return {"params": pp["model_n_params"], "nonzero_params": None, "size_bytes": os.path.getsize(path),
            "prefill_tok_s": pp["avg_ts"], "ttft_s": s["prompt_tokens"] / pp["avg_ts"] + 1 / tg["avg_ts"],
            "decode_tok_s": {"1": tg["avg_ts"]} | batched, "peak_rss_bytes": max(peak, batched_peak),
            "peak_cuda_bytes": None, "notes": notes}


def _batched_decode(path: str, s: dict, batches: list[int]) -> tuple[dict[str, float], int]:
    """Decode tokens/s of ``batches`` parallel sequences (llama-batched-bench, its jsonl ``speed_tg``) and the
    run's peak RSS; nothing to run for batch 1 alone."""
    from slimlm.evaluation.llama_cpp import tool

    if not batches:
        return {}, 0
    context = max(batches) * (s["prompt_tokens"] + s["new_tokens"]) + 16  # every sequence's prompt and tokens
    args = ["-m", path, "-c", context, "-b", 2048, "-ub", 512, "-npp", s["prompt_tokens"], "-ntg", s["new_tokens"],
            "-npl", ",".join(map(str, batches)), "-t", s["threads"], "-ngl", 0 if s["device"] == "cpu" else 99,
            "--output-format", "jsonl"]
    rc, out, err, peak = _run_with_peak([str(tool("llama-batched-bench")), *map(str, args)])
    if rc != 0:
        raise SlimlmError(f"llama.cpp llama-batched-bench failed on {path} (exit {rc}): {_last_error(err)}")
    try:
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return {str(b): next(r["speed_tg"] for r in lines if r["pl"] == b) for b in batches}, peak
    except (ValueError, KeyError, StopIteration) as e:
        raise SlimlmError(f"llama-batched-bench printed no decode result for {path}") from e


def _bench_results(text: str, path: str) -> tuple[dict, dict]:
    """The pp record (n_gen 0) and the tg record (n_prompt 0) of llama-bench's JSON output."""
    try:
        tests = json.loads(text)
        return next(t for t in tests if t["n_gen"] == 0), next(t for t in tests if t["n_prompt"] == 0)
    except (ValueError, KeyError, TypeError, StopIteration) as e:
        raise SlimlmError(f"llama-bench printed no pp and tg results for {path}") from e


def _run_with_peak(cmd: list[str]) -> tuple[int, str, str, int]:
    """Run ``cmd``: (exit status, stdout, stderr, its peak RSS in bytes).

    It runs under a small ``python -c`` wrapper (PEAK_WRAPPER) that reads RUSAGE_CHILDREN after its one child.
    Read in this process, ru_maxrss would be wrong twice: Linux starts a child's ru_maxrss at its parent's peak
    (here, whatever this process holds), and RUSAGE_CHILDREN is the largest over all children waited for. The
    wrapper's own pages (about 15 MB, carried into its child at exec) are the floor of the figure."""
    done = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *cmd], capture_output=True, text=True)
    if done.returncode != 0:
        raise SlimlmError(f"could not run {cmd[0]}: {_last_error(done.stderr)}")
    report = json.loads(done.stdout)
    return report["rc"], report["out"], report["err"], report["maxrss"] * (1 if sys.platform == "darwin" else 1024)


# ---- summary ----

def _summary(name: str, runs: list[dict]) -> dict:
    """Medians over rounds of the timings, the largest peak (the memory a run must have) and every round's
    timings under 'samples', where the spread can be read."""
    first = runs[0]
    timings = ("prefill_tok_s", "ttft_s", "decode_tok_s")
    return {"model": name, **{k: first[k] for k in ("params", "nonzero_params", "size_bytes")},
            "prefill_tok_s": _median([r["prefill_tok_s"] for r in runs]),
            "ttft_s": _median([r["ttft_s"] for r in runs]),
            "decode_tok_s": {b: _median([r["decode_tok_s"][b] for r in runs]) for b in first["decode_tok_s"]},
            "peak_rss_bytes": _max([r["peak_rss_bytes"] for r in runs]),
            "peak_cuda_bytes": _max([r["peak_cuda_bytes"] for r in runs]),
            "samples": {k: [r[k] for r in runs] for k in timings}, "notes": first["notes"]}


def _median(values: list):
    return None if None in values else statistics.median(values)


def _max(values: list):
    return None if None in values else max(values)


def _ratios(entry: dict, base: dict) -> dict:
    ratios = {k: _ratio(entry[k], base[k]) for k in RATIO_KEYS}
    ratios["decode_tok_s"] = {b: _ratio(v, base["decode_tok_s"].get(b)) for b, v in entry["decode_tok_s"].items()}
    return ratios


def _round_ranges(entry: dict, base: dict) -> dict:
    """[lowest, highest] over the rounds of each round's ratio to the baseline's same round (the rounds alternate,
    so a round's two figures shared the machine's state): where it spans 1, the difference is the machine's noise."""
    def span(ours, theirs):
        pairs = [a / b for a, b in zip(ours, theirs) if a is not None and b]
        return [min(pairs), max(pairs)] if pairs else None
    mine, theirs = entry["samples"], base["samples"]
    ranges = {k: span(mine[k], theirs[k]) for k in ("prefill_tok_s", "ttft_s")}
    ranges["decode_tok_s"] = {b: span([r[b] for r in mine["decode_tok_s"]], [r.get(b) for r in theirs["decode_tok_s"]])
                              for b in entry["decode_tok_s"]}
    return ranges


def _noise_warnings(entries: list[dict], repeats: int) -> list[str]:
    """What makes the ratios unreliable: one round (no spread to read), a loaded machine, or a ratio whose rounds
    fall on both sides of 1."""
    warnings = []
    if repeats < 3:
        warnings.append(f"{repeats} round(s): no spread to judge the ratios by; use --repeats 3 or more")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        warnings.append(f"the machine is loaded (load average {load:.1f} on {cores} cores): timings are noisy")
    for entry in entries[1:]:
        ranges = entry["round_ranges"]
        spans = {"prefill": ranges["prefill_tok_s"], "TTFT": ranges["ttft_s"],
                 **{f"decode b{b}": r for b, r in ranges["decode_tok_s"].items()}}
        noisy = [name for name, r in spans.items() if r and r[0] < 1 < r[1]]
        if noisy:
            warnings.append(f"{entry['model']}: the rounds' ratios fall on both sides of 1 for "
                            f"{', '.join(noisy)}: within the machine's noise")
    return warnings


def _ratio(value, base):
    return value / base if value is not None and base else None


def main(argv: list[str] | None = None) -> int:
    """Internal entry of one transformers round: ``python -m slimlm.evaluation.speed MODEL ...`` prints its JSON
    as the last stdout line; a SlimlmError is one ``slimlm: error:`` line on stderr and exit status 2."""
    p = argparse.ArgumentParser(prog="python -m slimlm.evaluation.speed")
    p.add_argument("model")
    for flag in ("--prompt-tokens", "--new-tokens", "--threads"):
        p.add_argument(flag, type=int, required=True)
    p.add_argument("--batches", type=lambda text: [int(b) for b in text.split(",")], required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args(argv)
    try:
        sample = measure_in_process(a.model, a.prompt_tokens, a.new_tokens, a.batches, a.threads, a.device, a.dtype)
    except SlimlmError as e:
        print(f"slimlm: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(sample))
    return 0


if __name__ == "__main__":
    sys.exit(main())
