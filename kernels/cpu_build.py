"""Build, cache and load the ``_llmq_cpu`` extension (``kernels/csrc/cpu_quant.cpp``).

The extension is a plain CPython module compiled with the system C++ compiler on first use
(about 20 s) and cached under ``$LLMQ_CACHE/cpu_kernels`` (default ``~/.cache/llmq``), keyed
by the source, the compiler, the flags and the Python ABI. It needs Linux on x86-64 with
AVX2, FMA and F16C; anywhere else, or when the compiler is missing or fails, :func:`load`
warns once and returns ``None`` so that callers keep the torch path.

OpenMP: the module is linked against the OpenMP runtime torch has already loaded, so the
kernels and torch share one thread pool instead of two pools spinning on the same cores.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_quant.cpp"
MODULE_NAME = "_llmq_cpu"
CPU_FLAGS = ("avx2", "fma", "f16c")
COMPILE_FLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-fopenmp", "-fvisibility=hidden")
OPENMP_RUNTIMES = ("libgomp", "libiomp5", "libomp")

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where built kernels live: ``$LLMQ_CACHE/cpu_kernels``; ``LLMQ_CACHE`` defaults to ``~/.cache/llmq``."""
    return Path(os.environ.get("LLMQ_CACHE", "~/.cache/llmq")).expanduser() / "cpu_kernels"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The feature flags of this CPU from ``/proc/cpuinfo`` (``avx2``, ``avx512_bf16``, ...);
    raises ``OSError`` where it cannot be read."""
    with open("/proc/cpuinfo") as f:
        return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))


def cpu_supported() -> str | None:
    """``None`` when this CPU can run the kernels, else the reason it cannot."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs Linux on x86-64, this is {sys.platform} on {platform.machine()}"
    try:
        flags = cpu_flags()
    except OSError as e:
        return f"cannot read /proc/cpuinfo ({e})"
    missing = [flag for flag in CPU_FLAGS if flag not in flags]
    return f"CPU lacks {', '.join(missing)}" if missing else None


def _openmp_runtime() -> str | None:
    """Path of the OpenMP runtime already mapped into this process (torch's), if any."""
    torch.get_num_threads()  # makes sure torch's runtime is loaded before looking
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if ".so" in line}
    except OSError:
        return None
    for runtime in OPENMP_RUNTIMES:
        prefixes = (runtime + ".", runtime + "-")
        found = sorted(p for p in paths if os.path.basename(p).startswith(prefixes) and os.path.isfile(p))
        if found:
            return found[0]
    return None


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(cxx: str, target: Path) -> None:
    """Compile and link into ``target`` atomically (concurrent builders each write a temp dir)."""
    include = sysconfig.get_paths()["include"]
    openmp = _openmp_runtime()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "cpu_quant.o", Path(tmp) / target.name
        subprocess.run([cxx, *COMPILE_FLAGS, f"-I{include}", "-c", str(SOURCE), "-o", str(obj)],
                       check=True, capture_output=True, text=True)
        # Linking the loaded runtime by path (instead of -fopenmp's -lgomp) keeps one OpenMP pool
        # even when torch ships its runtime under a private name.
        runtime = [openmp, f"-Wl,-rpath,{os.path.dirname(openmp)}"] if openmp else ["-fopenmp"]
        subprocess.run([cxx, "-shared", str(obj), "-o", str(lib), *runtime],
                       check=True, capture_output=True, text=True)
        os.replace(lib, target)


def _target(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cxx.encode(), version.encode(), " ".join(COMPILE_FLAGS).encode(),
                 str(_openmp_runtime()).encode(), sys.version.encode()):
        key.update(part)
    return cache_dir() / f"{MODULE_NAME}_{key.hexdigest()[:16]}{sysconfig.get_config_var('EXT_SUFFIX')}"


@functools.lru_cache(maxsize=1)
def load() -> ModuleType | None:
    """The compiled module (built on first use), or ``None`` after one warning saying why not."""
    reason = cpu_supported()
    cxx = _compiler()
    if reason is None and cxx is None:
        reason = "no C++ compiler found (set CXX or install g++)"
    if reason is None and not SOURCE.is_file():
        reason = f"kernel source {SOURCE} is missing"
    if reason is None:
        try:
            target = _target(cxx)
            if not target.is_file():
                log.info("building llmq CPU kernels into %s (once)", target)
                _build(cxx, target)
            loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(target))
            spec = importlib.util.spec_from_file_location(MODULE_NAME, target, loader=loader)
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
            return module
        except subprocess.CalledProcessError as e:
            reason = f"the build failed: {' '.join(e.cmd[:2])} ...\n{e.stderr.strip()[-2000:]}"
        except (OSError, ImportError) as e:
            reason = f"the build could not be loaded ({e})"
    warnings.warn(f"llmq CPU kernels unavailable, using the slow torch path: {reason}",
                  RuntimeWarning, stacklevel=3)
    return None
