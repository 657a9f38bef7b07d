"""Where a results row comes from: the command, the code version, the machine and the date.

Every script that writes a figure of the README stores :func:`provenance` in each row it writes
(``evals/report.py`` turns it into the tables' "code" column and notes). Paths are written
relative to the repository or to the home folder, never as this machine's absolute paths.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Folders whose changes make a row's code differ from its commit (results and docs do not).
CODE_PATHS = ("llmq", "kernels", "evals/*.py", "scripts", "pyproject.toml")


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """CPU model, logical cores, and the versions of Python, torch and transformers."""
    import torch
    import transformers

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _portable(arg: str) -> str:
    """``arg`` with the repository and home folders written as ``.`` and ``~``."""
    for folder, short in ((str(ROOT), "."), (str(Path.home()), "~")):
        arg = arg.replace(folder, short)
    return arg


def command(argv: list[str] | None = None) -> str:
    """The command line that runs this script, as typed from the repository root."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    shown = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else script.name
    return " ".join(["python", shown, *map(_portable, argv[1:])])


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """The provenance of rows measured by this process, taken when they are written: command, git
    commit (and whether the code differed from it), machine, UTC date and the load average
    (1, 5, 15 minutes; other processes on the machine slow every timing down)."""
    changed = _git("status", "--porcelain", "--", *CODE_PATHS)
    return {
        "command": command(argv),
        "commit": _git("rev-parse", "HEAD") or "unknown",
        "code_modified": bool(changed) if changed is not None else None,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a results file (indented, newline-terminated) through a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def update_runs(path: Path, checkpoint: dict[str, Any], runs: dict[str, Any],
                order: list[str] | None = None) -> dict[str, Any]:
    """Write ``{checkpoint, runs}`` to ``path``, keeping the runs of an existing file for the same
    ``checkpoint`` that were not run again (in ``order`` when given); return the runs written."""
    previous = json.loads(path.read_text()) if path.exists() else None
    if previous and previous.get("checkpoint") == checkpoint:
        runs = {**previous["runs"], **runs}
    if order is not None:
        runs = {k: runs[k] for k in order if k in runs}
    write_json(path, {"checkpoint": checkpoint, "runs": runs})
    return runs


def seed_key(name: str, seed: int) -> str:
    """The results key of configuration ``name`` quantized with ``--seed seed`` (seed 0: ``name``)."""
    return name if seed == 0 else f"{name}@seed{seed}"


def seeds_path(path: Path) -> Path:
    """Where the rows of seeds other than 0 go, beside the results file ``path``."""
    return path.with_name(f"{path.stem}_seeds.json")


def by_seed(runs: dict[str, Any], configs: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``runs`` split into the seed-0 rows and the others, each in the order of ``configs`` (then
    by seed); rows of configurations no longer in ``configs`` are dropped."""
    def order(key: str) -> tuple[int, int]:
        name, _, seed = key.partition("@seed")
        return configs.index(name), int(seed or 0)

    known = sorted((k for k in runs if k.partition("@")[0] in configs), key=order)
    return {k: runs[k] for k in known if "@" not in k}, {k: runs[k] for k in known if "@" in k}
