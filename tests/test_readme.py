"""Every command the README and its pages (docs/*.md) show runs as written, on the built-in model, from a fresh
folder beside ../shared.

Each ```bash block runs its commands in order (a later command may use an earlier one's output; a block never
needs another block's), and each ```python block runs as one script, in a fresh temporary folder laid out like a
checkout: ``REPO/`` (the working directory, with this repository's
``scripts``, ``recipes`` and ``bench`` linked in) next to ``shared`` (linked to the real ``../shared``). ``slimlm``
there is this checkout's, and ``$SLIMLM_CACHE`` a private copy (hard links) of the converted built-in model, so
that ``slimlm cache clear`` clears only that copy and no block pays the conversion again. Two lines of the README's first block are not run again here: ``bash scripts/install.sh``
(CI runs it before the tests) and the test command itself. Blocks marked ``<!-- readme-test: bench -->`` on the
line above them take longer than the suite should (a full-size calibration or evaluation); they are run by
``python -m pytest -m readme_bench tests/test_readme.py`` instead of the default suite. Blocks marked
``<!-- readme-test: llama.cpp -->`` need llama.cpp's tools (scripts/build_llama_cpp.sh): they run with the tools
already built (``$SLIMLM_LLAMA_CPP``), and skip, saying so, where they are not.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
NOT_RERUN = ("bash scripts/install.sh && ", "SLIMLM_DATA_DIR=../shared/data python3 -m pytest")
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]  # the README and the pages it links
BENCH_MARK = "<!-- readme-test: bench -->"
LLAMA_CPP_MARK = "<!-- readme-test: llama.cpp -->"


def readme_blocks(text: str) -> list[tuple[int, list[str], str | None]]:
    """``(line number, commands, mark)`` of every bash and python block: a bash block's commands with comments
    dropped and continuations joined, a python block as one ``python3 -c`` command; mark is the block's
    ``<!-- readme-test: ... -->`` line (BENCH_MARK, LLAMA_CPP_MARK) or None."""
    blocks = []
    for match in re.finditer(r"^```(bash|python)\n(.*?)^```", text, flags=re.S | re.M):
        line = text[: match.start()].count("\n") + 1
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
        if match.group(1) == "python":
            commands = [f"python3 -c {shlex.quote(match.group(2))}"]
        else:
            commands = []
            for raw in match.group(2).replace("\\\n", " ").splitlines():
                command = re.sub(r"\s+#.*$", "", raw).strip()
                if command and not command.startswith("#"):
                    commands.append(command)
        blocks.append((line, commands, before.strip() if before.strip() in (BENCH_MARK, LLAMA_CPP_MARK) else None))
    return blocks


def test_blocks_are_read_as_the_shell_would():
    text = "x\n```bash\nslimlm a --b 1   # note\n# only a comment\nslimlm c \\\n  --d 2\n```\n" \
           f"{BENCH_MARK}\n```bash\nslimlm e\n```\n```python\nprint('a # b')\n```\n```yaml\nk: v\n```\n"
    assert readme_blocks(text) == [(2, ["slimlm a --b 1", "slimlm c    --d 2"], None), (9, ["slimlm e"], BENCH_MARK),
                                   (12, ["python3 -c 'print('\"'\"'a # b'\"'\"')\n'"], None)]


def _params(bench: bool):
    from slimlm.evaluation.llama_cpp import llama_cpp_bin

    params = []
    for page in PAGES:
        for line, commands, mark in readme_blocks(page.read_text()):
            if (mark == BENCH_MARK) != bench:
                continue
            marks = [pytest.mark.readme_bench] if bench else []
            if mark == LLAMA_CPP_MARK and llama_cpp_bin() is None and os.environ.get("CI") != "true":
                # under CI a missing build fails these blocks instead (CI builds the tools first)
                marks.append(pytest.mark.skip(reason="llama.cpp tools are not built (bash scripts/build_llama_cpp.sh)"))
            params.append(pytest.param(commands, id=f"{page.stem}-line{line}", marks=marks))
    return params


@pytest.fixture
def checkout(tmp_path, builtin_folder):
    """A folder laid out like a checkout beside ../shared, with a `slimlm` that runs this repository's code."""
    if not (SHARED / "data").is_dir():
        pytest.fail(f"{SHARED / 'data'} is missing: the README's commands read ../shared/data")
    (tmp_path / "shared").symlink_to(SHARED)
    work = tmp_path / "REPO"
    work.mkdir()
    for name in ("scripts", "recipes", "bench"):
        if (REPO / name).exists():
            (work / name).symlink_to(REPO / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "slimlm").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m slimlm "$@"\n')
    (bin_dir / "slimlm").chmod(0o755)
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copytree(builtin_folder, cache / builtin_folder.name, copy_function=os.link)
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO), "SLIMLM_CACHE": str(cache)}
    env.pop("SLIMLM_DATA_DIR", None)  # as on a new user's machine: the commands name their data themselves
    from slimlm.evaluation.llama_cpp import llama_cpp_bin

    if llama_cpp_bin() is not None:  # the tools built here (the private cache has none): no second build
        env["SLIMLM_LLAMA_CPP"] = str(llama_cpp_bin())
    return work, env


def run_block(commands: list[str], work: Path, env: dict) -> None:
    for command in commands:
        for prefix in NOT_RERUN:
            if command.startswith(prefix):
                command = command[len(prefix):] if prefix.endswith("&& ") else ""
        if not command:
            continue
        done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"`{command}` failed ({done.returncode}):\n{done.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("commands", _params(bench=False))
def test_readme_block_runs_as_written(commands, checkout):
    run_block(commands, *checkout)


@pytest.mark.parametrize("commands", _params(bench=True))
def test_readme_bench_block_runs_as_written(commands, checkout):
    run_block(commands, *checkout)


def test_every_page_the_readme_links_exists_and_is_tested():
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)\)", (REPO / "README.md").read_text()))
    assert linked and {REPO / link for link in linked} == set(PAGES[1:])
