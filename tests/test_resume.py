"""Resumable quantization (``llmq quantize --resume``): a run killed with SIGKILL after a block,
inside one, while its state is written or while the output is assembled continues to the bytes of
an uninterrupted run; SIGTERM and SIGINT stop after the block in progress with the command that
continues; a stale folder is reported with that command; other arguments, another source or a
damaged state are refused, and what was left stays in place."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmq import cli, outdir, resume

_spec = importlib.util.spec_from_file_location("hostile_inputs", Path(__file__).parents[1] / "scripts" /
                                               "hostile_inputs.py")
hostile = sys.modules["hostile_inputs"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(hostile)

BLOCKS = 4
# Per block: 7 linears of 4 tensors each (qweight, qzeros, scales, g_idx) go through ShardWriter.add.
ADDS_PER_BLOCK = 28
METHOD_ARGS = {"rtn": ["--method", "rtn", "--group-size", "32"],
               "gptq": ["--method", "gptq", "--group-size", "32", "--nsamples", "8", "--calib-seqlen", "32"],
               # learned rounding (RTN start): its targets and tuned codes come out the same after a resume
               "tune": ["--method", "rtn", "--group-size", "32", "--nsamples", "8", "--calib-seqlen", "32", "--tune",
                        "--tune-steps", "4"],
               # error propagation: the unquantized blocks' outputs are computed again for the blocks done
               "qep": ["--method", "gptq", "--group-size", "32", "--nsamples", "8", "--calib-seqlen", "32", "--qep"]}

# A quantize command in a child process that signals itself on the N-th call of one of llmq's
# functions, before the call or after it returns: argv[1] is JSON {"hook", "at": [N...], "signal", "after"}.
CHILD = r"""
import json, os, signal, sys
from llmq import checkpoint, cli, resume
spec = json.loads(sys.argv[1])
owner, name = {"commit": (resume.RunState, "commit"), "add": (checkpoint.ShardWriter, "add"),
               "fsync": (resume, "_fsync"), "write_config": (checkpoint, "write_config")}[spec["hook"]]
original, calls = getattr(owner, name), [0]
def hooked(*args, **kwargs):
    calls[0] += 1
    fire = calls[0] in spec["at"]
    if fire and not spec["after"]:
        os.kill(os.getpid(), getattr(signal, spec["signal"]))
    result = original(*args, **kwargs)
    if fire and spec["after"]:
        os.kill(os.getpid(), getattr(signal, spec["signal"]))
    return result
setattr(owner, name, hooked)
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny Llama of four blocks with a byte-level tokenizer, and a calibration text beside it."""
    root = tmp_path_factory.mktemp("resume-model")
    (root / "calib.txt").write_text(hostile.TEXT * 20)
    return hostile.tiny_llama(root / "m", layers=BLOCKS)


def argv(model: Path, out: Path, method: str) -> list[str]:
    return ["quantize", "--model", str(model), "--out", str(out), "--calib", str(model.parent / "calib.txt"),
            *METHOD_ARGS[method]]


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> dict[str, Path]:
    """Each method's output from an uninterrupted run."""
    root = tmp_path_factory.mktemp("resume-reference")
    for method in METHOD_ARGS:
        assert cli.main(argv(model, root / method, method)) == 0
    return {method: root / method for method in METHOD_ARGS}


def child(args: list[str], hook: str, at: list[int], sig: str = "SIGKILL", after: bool = False,
          ) -> subprocess.CompletedProcess:
    spec = json.dumps({"hook": hook, "at": at, "signal": sig, "after": after})
    return subprocess.run([sys.executable, "-c", CHILD, spec, *args], capture_output=True, text=True, timeout=300)


def assert_same_files(a: Path, b: Path) -> None:
    """Two folders hold the same files, byte for byte."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith((".tmp-", f".{out.name}.")))


def finished_blocks(out: Path) -> int:
    """How many blocks the state left beside ``out`` records as finished."""
    (tmp,) = out.parent.glob(f".tmp-{out.name}-*")
    progress = tmp / resume.STATE / resume.PROGRESS
    return len(json.loads(progress.read_text())["blocks"]) if progress.exists() else 0


def resume_counting(args: list[str], monkeypatch) -> tuple[int, int]:
    """Run ``args`` in this process; its exit status and how many blocks it quantized."""
    commits = []
    original = resume.RunState.commit
    monkeypatch.setattr(resume.RunState, "commit", lambda self, *a, **k: (commits.append(1), original(self, *a, **k)))
    return cli.main(args), len(commits)


@pytest.mark.parametrize("method, hook, at, after, finished", [
    ("gptq", "commit", 1, True, 1),  # block 0 saved
    ("gptq", "add", ADDS_PER_BLOCK + 12, False, 1),  # inside block 1, among its tensors
    ("gptq", "fsync", 10, False, 1),  # block 1's tensors in place, its next inputs being written
    ("gptq", "fsync", 13, False, 2),  # block 1 recorded, the inputs it replaces not yet removed
    ("gptq", "write_config", 1, False, BLOCKS),  # every block done, the output being assembled
    ("rtn", "commit", 3, True, 3),
    ("rtn", "add", 2 * ADDS_PER_BLOCK + 14, False, 2),
    ("tune", "commit", 2, True, 2),
    ("qep", "commit", 2, True, 2),
])
def test_sigkill_then_resume_gives_the_uninterrupted_bytes(model, reference, tmp_path, monkeypatch, method, hook, at,
                                                          after, finished):
    out = tmp_path / "q"
    r = child(argv(model, out, method), hook, [at], after=after)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not out.exists() and len(leftovers(out)) == 2
    assert finished_blocks(out) == finished
    code, quantized = resume_counting([*argv(model, out, method), "--resume"], monkeypatch)
    assert code == 0 and quantized == BLOCKS - finished
    assert_same_files(out, reference[method])
    assert leftovers(out) == []


@pytest.mark.parametrize("sig, at, code, done", [
    ("SIGTERM", [ADDS_PER_BLOCK + 12], 143, 2),  # inside block 1: stops once block 1 is saved
    ("SIGINT", [ADDS_PER_BLOCK + 12], 130, 2),
    ("SIGTERM", [ADDS_PER_BLOCK + 12, ADDS_PER_BLOCK + 13], 143, 1),  # the second one stops at once
])
def test_signals_stop_after_the_block_with_the_command_that_continues(model, reference, tmp_path, monkeypatch, sig,
                                                                      at, code, done):
    out = tmp_path / "q"
    args = argv(model, out, "gptq")
    r = child(args, "add", at, sig=sig)
    assert r.returncode == code
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr and r.stdout == ""
    command = shlex.join(["llmq", *args, "--resume"])
    assert r.stderr.strip().splitlines()[-1] == (
        f"llmq quantize: stopped by {sig} with {done} of {BLOCKS} blocks done; continue with: {command}")
    lock = json.loads(outdir.lock_path(out).read_text())
    assert lock["stopped"] and finished_blocks(out) == done
    assert resume_counting(shlex.split(command)[1:], monkeypatch) == (0, BLOCKS - done)
    assert_same_files(out, reference["gptq"])
    assert leftovers(out) == []


def stop_after_first_block(args: list[str], monkeypatch) -> None:
    """Run ``args`` in this process, stopped by a SIGTERM that arrives while block 0 is saved."""
    original = resume.RunState.commit

    def commit(self, *a, **k):
        original(self, *a, **k)
        os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(resume.RunState, "commit", commit)
        before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
        assert cli.main(args) == 143
        assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before


def one_line_error(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("quantize ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_stale_folder_reported_with_both_commands(model, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    args = argv(model, out, "rtn")
    stop_after_first_block(args, monkeypatch)
    capsys.readouterr()
    assert cli.main(args) == 2
    line = one_line_error(capsys)
    (tmp,), lock = out.parent.glob(".tmp-q-*"), outdir.lock_path(out)
    info = json.loads(lock.read_text())
    assert line == (f"llmq quantize: error: an earlier run writing {out} was stopped (pid {os.getpid()}, started "
                    f"{info['started']}, stopped {info['stopped']}); continue it: "
                    f"{shlex.join(['llmq', *args, '--resume'])}; or remove what it left: rm -rf -- {tmp} {lock}")
    subprocess.run(line[line.index("rm -rf -- "):], shell=True, check=True)
    assert leftovers(out) == []
    assert cli.main(args) == 0
    assert_same_files(out, reference["rtn"])


def test_other_arguments_or_source_refused_and_the_state_kept(model, reference, tmp_path, monkeypatch, capsys):
    src = shutil.copytree(model, tmp_path / "m")
    shutil.copy(model.parent / "calib.txt", tmp_path)
    out = tmp_path / "q"
    args = argv(src, out, "gptq")
    stop_after_first_block(args, monkeypatch)
    left = leftovers(out)
    refusals = {"--bits": ("3", "bits was 4 in the stopped run, 3 in this one"),
                "--nsamples": ("4", "calibration nsamples was 8 in the stopped run, 4 in this one"),
                "--seed": ("1", "calibration seed was 0 in the stopped run, 1 in this one"),
                "--dtype": ("bfloat16", "the output dtype (--dtype) was float16 in the stopped run, bfloat16 in "
                                        "this one")}
    for flag, (value, message) in refusals.items():
        capsys.readouterr()
        assert cli.main([*args, flag, value, "--resume"]) == 2  # the last --nsamples counts
        assert f"error: cannot resume: {message}; pass the same arguments" in one_line_error(capsys)
        assert leftovers(out) == left and finished_blocks(out) == 1
    calib = tmp_path / "calib.txt"
    text = calib.read_text()
    calib.write_text(text.upper())
    assert cli.main([*args, "--resume"]) == 2
    assert "the calibration tokens changed since the stopped run" in one_line_error(capsys)
    calib.write_text(text)
    os.utime(src / "config.json")
    assert cli.main([*args, "--resume"]) == 2
    assert "the source checkpoint's files (names, sizes or modification times) changed" in one_line_error(capsys)
    os.utime(src / "config.json", ns=(0, (model / "config.json").stat().st_mtime_ns))
    assert cli.main([*args, "--resume"]) == 0
    # config.json names the source folder, another one here
    assert (out / "model.safetensors").read_bytes() == (reference["gptq"] / "model.safetensors").read_bytes()


def test_damaged_state_refused_and_kept(model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    args = argv(model, out, "rtn")
    stop_after_first_block(args, monkeypatch)
    (tmp,) = out.parent.glob(".tmp-q-*")
    block = tmp / resume.STATE / "block-00000" / "model.safetensors"
    block.write_bytes(block.read_bytes()[:-10])
    capsys.readouterr()
    assert cli.main([*args, "--resume"]) == 2
    assert "cannot resume: what the stopped run left is damaged" in one_line_error(capsys)
    assert block.exists()


def test_resume_with_nothing_left_runs_from_the_start(model, reference, tmp_path, monkeypatch):
    out = tmp_path / "q"
    assert resume_counting([*argv(model, out, "gptq"), "--resume"], monkeypatch) == (0, BLOCKS)
    assert_same_files(out, reference["gptq"])


def test_resume_refuses_a_run_still_writing(model, tmp_path, capsys):
    out = tmp_path / "q"
    with pytest.raises(RuntimeError, match="end of the run"), outdir.atomic_output(out):
        assert cli.main([*argv(model, out, "rtn"), "--resume"]) == 2
        assert "is being written by another llmq run" in one_line_error(capsys)
        raise RuntimeError("end of the run")
    assert leftovers(out) == []


def test_take_over_refused_when_another_run_took_the_lock_first(tmp_path):
    out = tmp_path / "q"
    with pytest.raises(resume.Stopped), outdir.atomic_output(out, keep=(resume.Stopped,)):
        raise resume.Stopped(signal.SIGTERM, 0, 1)
    stale = outdir._resumable(out)
    taken = outdir._take_over(out, stale)  # this process takes the lock over...
    with pytest.raises(outdir.OutputError, match="took over the lock"):
        outdir._take_over(out, stale)  # ...so a second taker, which read the same stale lock, is refused
    assert json.loads(outdir.lock_path(out).read_text()) == taken
