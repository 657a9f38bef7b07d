"""Resumable quantize runs: what a run keeps in its temporary folder so that, stopped at any point
(a signal, SIGKILL, a power cut), it can continue where it stopped, with the same result.

The temporary folder of a run (see :mod:`llmq.outdir`) holds a folder ``.llmq-resume`` with:

- ``manifest.json``: what decides the result (see :func:`manifest`), written when the run starts;
- ``block-NNNNN/model.safetensors``: the output tensors of finished block N, in the order the
  output checkpoint stores them;
- ``inputs-NNNNN/model.safetensors``: GPTQ's calibration hidden states entering block N, the
  first unfinished one;
- ``progress.json``: each finished block's quantized layers, error and notes, and the inputs' folder.

Every file is written under another name, flushed to disk and renamed into place, and
``progress.json`` is renamed last: at any moment it names complete files only. A resumed run
checks the manifest, removes whatever the stopped run wrote after its last ``progress.json``, and
continues from the first unfinished block. Every run assembles the output's shards from the block
files once all blocks are done, so a resumed run writes the bytes an uninterrupted one writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmq import __version__, outdir, streaming

if TYPE_CHECKING:  # llmq.checkpoint imports transformers: the command line imports this module without it
    from llmq.calibration import Calibration
    from llmq.checkpoint import ShardWriter
    from llmq.config import QuantConfig
    from llmq.pipeline.capture import Batch

STATE = ".llmq-resume"
MANIFEST, PROGRESS = "manifest.json", "progress.json"
_PART = ".part"  # a block's or the inputs' folder while it is written
# Manifest entries named as a user knows them (others by their key: "bits", "calibration nsamples"...);
# the hashes' values say nothing to a user and are not shown.
_LABELS = {"model": "the source checkpoint", "out_dtype": "the output dtype (--dtype)",
           "device": "the device type (--device)", "max_shard_bytes": "the shard size (--max-shard-size)"}
_HASHES = {"model_files": "the source checkpoint's files (names, sizes or modification times)",
           "calibration_tokens": "the calibration tokens"}

class ResumeError(ValueError):
    """The state a stopped run left cannot be continued: other arguments or source, or damaged."""


class Stopped(BaseException):
    """A signal stopped the run at a safe point; its temporary folder stays for a resume. Not an
    ``Exception``, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int, finished: int, total: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} with {finished} of {total} blocks done")
        self.signum, self.finished, self.total = signum, finished, total


def source_files(folder: Path) -> str:
    """sha256 over the name, size and modification time of every file of checkpoint ``folder``
    (links followed; hidden files and subfolders left out).

    Not over their contents: that would read the whole checkpoint (minutes for a large model) at
    every start, while rewriting a file, as saving or copying a checkpoint does, changes its time.
    A file changed with its old time put back (``touch -d``, ``cp -p``) goes unseen.
    """
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if not path.name.startswith(".") and path.is_file():
            st = path.stat()
            h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def manifest(src: Path, config: QuantConfig, calibration: Calibration | None, **settings: Any) -> dict[str, Any]:
    """What decides a run's result, as JSON values: llmq's and torch's versions, the source
    checkpoint (its folder and :func:`source_files`), the quantization config (with the
    calibration's settings, for GPTQ), a sha256 of the calibration token ids ``[n, seqlen]`` and
    ``settings`` (output dtype, device type, batch size, shard size...)."""
    tokens = None
    if calibration is not None:
        ids = calibration.input_ids.to(torch.int64).contiguous()
        tokens = hashlib.sha256(str(list(ids.shape)).encode() + ids.numpy().tobytes()).hexdigest()
    entries = {"llmq": __version__, "torch": torch.__version__, "model": str(src), "model_files": source_files(src),
               "config": config.to_dict(), "calibration_tokens": tokens, **settings}
    return json.loads(json.dumps(entries))  # tuples as lists, as read back


def _difference(old: Any, new: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first entry (dotted key, old value, new value) where two manifests differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in [*old, *(k for k in new if k not in old)]:
            found = _difference(old.get(k), new.get(k), f"{key}.{k}" if key else k)
            if found:
                return found
        return None
    return None if old == new else (key, old, new)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


class RunState:
    """The resumable state of a run writing ``out`` in temporary folder ``tmp`` (see the module's
    doc): a new one, or with ``resume``, the one a stopped run left there, checked against the
    manifest ``expected`` (``ResumeError`` when it differs), with whatever that run wrote after its
    last finished block removed.

    ``blocks``: per finished block, ``{"quantized": [layer names], "error": mean relative error,
    "notes": [what was done otherwise than asked]}``.
    """

    def __init__(self, tmp: Path, out: Path, expected: dict[str, Any], resume: bool) -> None:
        self.folder = tmp / STATE
        self._remove_command = outdir.remove_command(out, tmp.name)
        self.blocks: list[dict[str, Any]] = []
        self._inputs: str | None = None
        if resume and (self.folder / MANIFEST).is_file():
            self._continue(expected)
        else:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            self.folder.mkdir()
            self._write_json(MANIFEST, expected)
        keep = {MANIFEST, PROGRESS, self._inputs, *map(_block_name, range(len(self.blocks)))}
        for entry in [*tmp.iterdir(), *self.folder.iterdir()]:
            if entry.name != STATE and entry.name not in keep:
                _remove(entry)

    def _continue(self, expected: dict[str, Any]) -> None:
        try:
            found = _difference(json.loads((self.folder / MANIFEST).read_text()), expected)
            progress = {"blocks": [], "inputs": None}
            if (self.folder / PROGRESS).exists():
                progress = json.loads((self.folder / PROGRESS).read_text())
            self.blocks, self._inputs = list(progress["blocks"]), progress["inputs"]
            for i in range(len(self.blocks)):
                streaming.ShardReader(self.folder / _block_name(i))  # checks the file against its header
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ResumeError(f"cannot resume: what the stopped run left is damaged ({e}); "
                              f"remove it to start again: {self._remove_command}") from None
        if found:
            key, old, new = found
            if key in _HASHES:
                what = f"{_HASHES[key]} changed since the stopped run"
            else:
                label = _LABELS.get(key) or key.removeprefix("config.").replace("meta.", "").replace(".", " ")
                what = f"{label} was {old} in the stopped run, {new} in this one"
            raise ResumeError(f"cannot resume: {what}; pass the same arguments, or remove what it left to start "
                              f"again: {self._remove_command}")

    def _write_json(self, name: str, data: Any) -> None:
        """Write ``name`` in the state folder atomically and durably."""
        part = self.folder / f"{_PART}-{name}"
        with open(part, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, self.folder / name)
        _fsync(self.folder)

    def _place(self, part: Path, name: str) -> None:
        """Make folder ``part`` and its files durable and rename it to ``name``."""
        for f in part.iterdir():
            _fsync(f)
        _fsync(part)
        os.rename(part, self.folder / name)

    def block_writer(self) -> ShardWriter:
        """A writer for the next block's tensors (one file, in a folder of its own until :meth:`commit`)."""
        from llmq.checkpoint import ShardWriter

        part = self.folder / _PART
        part.mkdir()
        return ShardWriter(part, max_shard_bytes=1 << 62)

    def commit(self, writer: ShardWriter, quantized: list[str], error: float,
               hidden: list[torch.Tensor] | None = None, notes: Iterable[str] = ()) -> None:
        """Record the next block as finished: its tensors (``writer``'s, see :meth:`block_writer`),
        its quantized layers, error and notes, and the hidden states entering the block after it (GPTQ's,
        per calibration batch); durably, ``progress.json`` last."""
        from llmq.checkpoint import save_tensors

        i = len(self.blocks)
        writer.close()
        self._place(writer.folder, _block_name(i))
        inputs = None
        if hidden is not None:
            part = self.folder / _PART
            part.mkdir()
            save_tensors(part / "model.safetensors", {f"batch.{b}": h for b, h in enumerate(hidden)})
            inputs = f"inputs-{i + 1:05d}"
            self._place(part, inputs)
        _fsync(self.folder)  # the renames above reach the disk before progress.json names them
        self.blocks.append({"quantized": quantized, "error": error, "notes": list(notes)})
        previous, self._inputs = self._inputs, inputs
        self._write_json(PROGRESS, {"blocks": self.blocks, "inputs": inputs})
        if previous:
            shutil.rmtree(self.folder / previous)

    def load_inputs(self, inputs: list[Batch]) -> None:
        """Put the hidden states saved for the first unfinished block into ``inputs`` (block 0's
        calibration batches, as captured), in place of each batch's ``hidden``."""
        reader = streaming.ShardReader(self.folder / str(self._inputs))
        keys = reader.keys()
        if len(keys) != len(inputs):
            raise ResumeError(f"cannot resume: {len(keys)} calibration batches were saved, this run has "
                              f"{len(inputs)}; remove what the stopped run left to start again: {self._remove_command}")
        for batch, key in zip(inputs, keys, strict=True):
            saved, hidden = reader.get(key), batch.hidden
            if saved.shape != hidden.shape or saved.dtype != hidden.dtype:
                raise ResumeError(f"cannot resume: saved hidden states {key} are {saved.dtype} {list(saved.shape)}, "
                                  f"this run's {hidden.dtype} {list(hidden.shape)}; remove what the stopped run "
                                  f"left to start again: {self._remove_command}")
            hidden.copy_(saved)

    def copy_blocks(self, writer: ShardWriter) -> set[str]:
        """Write every finished block's tensors to ``writer``, block after block, each block's in its
        order; return their names."""
        names = set()
        for i in range(len(self.blocks)):
            reader = streaming.ShardReader(self.folder / _block_name(i))
            for key in reader.keys():
                dtype, shape = reader.info(key)
                writer.add_chunks(key, reader.chunks(key), nbytes=streaming.DTYPES[dtype].itemsize * math.prod(shape))
                names.add(key)
        return names

    def remove(self) -> None:
        """Remove the state, once the output it built is complete."""
        shutil.rmtree(self.folder)


def _block_name(i: int) -> str:
    return f"block-{i:05d}"


class StopSignals:
    """While active (``with``), SIGINT and SIGTERM ask the run to stop at its next safe point:
    :meth:`check`, called at each one, then raises :class:`Stopped`. A second signal raises it at
    once: the run still resumes, from its last finished block. With ``enabled`` False, or outside
    the main thread (the only one that can set handlers), signals are left as they are. The
    handlers in place before are restored on exit."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self.finished = self.total = 0
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:
            raise Stopped(signum, self.finished, self.total)
        self.signum = signum
        os.write(2, f"\nllmq: {signal.Signals(signum).name}: stopping after the current block "
                    "(send it again to stop at once)\n".encode())

    def __enter__(self) -> StopSignals:
        if self.enabled:
            self._previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def check(self, finished: int, total: int) -> None:
        """A safe point, with ``finished`` of ``total`` blocks done: raise :class:`Stopped` if a signal came."""
        self.finished, self.total = finished, total
        if self.signum is not None:
            raise Stopped(self.signum, finished, total)
