"""llama.cpp's own tools as an evaluation engine: perplexity and KL divergence by ``llama-perplexity``.

The tools are built by ``scripts/build_llama_cpp.sh`` into ``$SLIMLM_CACHE/llama.cpp/<version>-<isa>/bin`` (or
found in ``$SLIMLM_LLAMA_CPP``). llama-perplexity splits the text into chunks of ``ctx`` tokens and scores the
second half of each (pitfalls.md); it reads the file's bytes as they are (test.raw keeps its CRLF line ends).
KLD: the reference file's logits are saved once (``--kl-divergence-base``), then the file under test is scored
against them (``--kl-divergence``): mean KL(reference || file) per token, and the file's perplexity.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from slimlm.core.cache import cache_dir
from slimlm.errors import SlimlmError

BUILD_SCRIPT = "scripts/build_llama_cpp.sh"


def llama_cpp_bin() -> Path | None:
    """The folder of the built tools: $SLIMLM_LLAMA_CPP, else the newest complete build in the cache."""
    if os.environ.get("SLIMLM_LLAMA_CPP"):
        return Path(os.environ["SLIMLM_LLAMA_CPP"])
    builds = sorted((cache_dir() / "llama.cpp").glob("*/.complete"), key=lambda p: p.stat().st_mtime)
    return builds[-1].parent / "bin" if builds else None


def tool(name: str) -> Path:
    """Path of one llama.cpp tool; SlimlmError naming the build script when it is missing."""
    folder = llama_cpp_bin()
    path = folder / name if folder else None
    if path is None or not path.is_file():
        raise SlimlmError(f"llama.cpp's {name} is not built; run: bash {BUILD_SCRIPT} (about 20 minutes, once), "
                          "or set SLIMLM_LLAMA_CPP to a folder holding it")
    return path


def run_tool(name: str, args: list[str], timeout: float | None = None) -> str:
    """Run a tool, return its stdout + stderr; SlimlmError with the last lines when it fails."""
    done = subprocess.run([str(tool(name)), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
        raise SlimlmError(f"llama.cpp {name} failed (exit {done.returncode}): {reason}")
    return output


def _number(pattern: str, text: str, what: str) -> float:
    match = re.search(pattern, text)
    if match is None:
        raise SlimlmError(f"llama-perplexity printed no {what}")
    return float(match.group(1))


def llama_perplexity(model: str | Path, text: str | Path, ctx: int = 512, chunks: int | None = None,
                     threads: int = 2, kld_base: str | Path | None = None, save_base: bool = False) -> dict:
    """llama-perplexity on ``text``, in the native evaluation's schema: {'engine', 'perplexity',
    'perplexity_error', 'windows' (the chunks it scored), 'seqlen'} and, with ``kld_base``, 'kld' (mean KL
    divergence from the logits saved there) and 'source_perplexity' (the reference's perplexity on the same
    chunks). ``save_base`` writes this model's logits to ``kld_base`` instead (the reference run)."""
    for path in (model, text):
        if not Path(path).is_file():
            raise SlimlmError(f"no such file: {path}")
    args = ["-m", model, "-f", text, "-c", ctx, "-t", threads, "-b", ctx]
    if chunks is not None:
        args += ["--chunks", chunks]
    if kld_base is not None:
        args += ["--kl-divergence-base", kld_base] + ([] if save_base else ["--kl-divergence"])
    output = run_tool("llama-perplexity", args)
    result = {"engine": "llama.cpp", "seqlen": ctx,
              "windows": int(_number(r"(?:calculating perplexity|computing) over (\d+) chunks", output, "chunk count"))}
    if kld_base is not None and not save_base:
        result["perplexity"] = _number(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", output, "perplexity")
        result["perplexity_error"] = _number(r"Mean PPL\(Q\)\s*:\s*[\d.]+\s*(?:±|\+/-)\s*([\d.]+)", output,
                                             "perplexity error")
        result["kld"] = _number(r"Mean\s+KLD:\s*([-\d.]+)", output, "mean KLD")
        result["source_perplexity"] = _number(r"Mean PPL\(base\)\s*:\s*([\d.]+)", output, "reference perplexity")
    else:
        result["perplexity"] = _number(r"Final estimate: PPL = ([\d.]+)", output, "perplexity")
        result["perplexity_error"] = _number(r"Final estimate: PPL = [\d.]+ \+/- ([\d.]+)", output,
                                             "perplexity error")
    return result
