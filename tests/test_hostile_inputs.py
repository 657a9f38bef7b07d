"""Bad, careless and hostile inputs: every case of ``scripts/hostile_inputs.py`` ends as it
should (exit status, one-line message, inputs unchanged, nothing left behind), in-process where
it can; plus the pieces those cases rest on, one at a time."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import calibration_ids, save_tiny
from safetensors.torch import save_file

from llmq import QuantConfig, outdir, streaming
from llmq.checkpoint import load_quantized, validate_quantized_layers
from llmq.pipeline import quantize
from llmq.quantizers.gptq import GPTQ, CalibrationError
from llmq.quantizers.rtn import rtn_quantize

_spec = importlib.util.spec_from_file_location("hostile_inputs", Path(__file__).parents[1] / "scripts" /
                                               "hostile_inputs.py")
hostile = sys.modules["hostile_inputs"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(hostile)


@pytest.mark.parametrize("case", [c for c in hostile.CASES if not c.subprocess_only], ids=lambda c: c.name)
def test_case_in_process(case, tmp_path):
    outcome = hostile.run_case(case, tmp_path, in_process=True)
    assert not outcome.problems, (outcome.problems, outcome.result.stderr[-2000:])


@pytest.mark.parametrize("case", [c for c in hostile.CASES if c.subprocess_only], ids=lambda c: c.name)
def test_case_in_subprocess(case, tmp_path):
    outcome = hostile.run_case(case, tmp_path)
    assert not outcome.problems, (outcome.problems, outcome.result.stderr[-2000:])


def test_cases_are_many_and_distinct():
    names = [c.name for c in hostile.CASES]
    assert len(names) >= 30 and len(set(names)) == len(names)


# --- The output folder ------------------------------------------------------------------------------

def test_lock_of_a_recycled_pid_is_stale(tmp_path):
    """A lock naming a live pid that another process holds now (another start time) is stale, and a
    lock whose folder name is not its own is unreadable: it never steers the removal command."""
    out = tmp_path / "q"
    with pytest.raises(RuntimeError, match="end of the run"), outdir.atomic_output(out) as tmp:
        lock = outdir.lock_path(out)
        own = lock.read_text()
        info = json.loads(own)
        with pytest.raises(outdir.OutputError, match=r"is being written by another llmq run \(pid"):
            outdir.check_output(out)
        lock.write_text(json.dumps({**info, "process": f"{info['process']}-then"}))
        with pytest.raises(outdir.OutputError, match=f"stopped without finishing.*rm -rf -- {tmp} {lock}$"):
            outdir.check_output(out)
        lock.write_text(json.dumps({**info, "pid": 2**22 + 1}))  # above Linux's pid_max: no such process
        with pytest.raises(outdir.OutputError, match="no longer running"):
            outdir.check_output(out)
        lock.write_text(json.dumps({**info, "tmp": "../../home"}))
        with pytest.raises(outdir.OutputError, match=f"cannot be read.*rm -f -- {lock}$"):
            outdir.check_output(out)
        lock.write_text(own)
        raise RuntimeError("end of the run")
    assert list(tmp_path.iterdir()) == []


def test_racing_runs_never_read_a_half_written_lock(tmp_path, monkeypatch):
    """Of runs taking the same lock at once, one gets it; the others read it whole and are told
    who writes (never that the lock cannot be read). Where hard links are unavailable the lock is
    still taken exclusively."""
    import errno
    import threading

    out, outcomes = tmp_path / "q", []
    for _ in range(20):
        start = threading.Barrier(8)

        def take(start=start):
            start.wait()
            try:
                outcomes.append(outdir._acquire(out))
            except outdir.OutputError as e:
                outcomes.append(str(e))

        threads = [threading.Thread(target=take) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [o for o in outcomes if isinstance(o, dict)]
        assert len(won) == 1 and won[0] == json.loads(outdir.lock_path(out).read_text())
        assert all("is being written by another llmq run" in o for o in outcomes if isinstance(o, str)), outcomes
        outdir.lock_path(out).unlink()
        assert list(tmp_path.iterdir()) == []  # no part file left beside
        outcomes.clear()

    def no_links(*_):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(outdir.os, "link", no_links)
    info = outdir._acquire(out)
    assert json.loads(outdir.lock_path(out).read_text()) == info
    with pytest.raises(outdir.OutputError, match="is being written by another llmq run"):
        outdir._acquire(out)
    assert [p.name for p in tmp_path.iterdir()] == [".q.llmq-lock"]


def test_interrupts_wait_while_the_result_is_renamed():
    """SIGINT/SIGTERM arriving during the renames are delivered after them."""
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *_: seen.append("TERM"))
    try:
        with outdir._signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == []
        assert seen == ["TERM"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_unwritable_output_refused_before_the_model_loads(tiny_models, tmp_path, monkeypatch):
    from llmq import models

    ro = tmp_path / "ro"
    ro.mkdir()
    if not hostile.read_only(ro):
        pytest.skip("no way to make a folder read-only here")
    monkeypatch.setattr(models, "build_skeleton", lambda *a, **k: pytest.fail("the model was loaded"))
    try:
        with pytest.raises(outdir.OutputError, match="cannot write in"):
            quantize(tiny_models["llama"], QuantConfig(), ro / "sub" / "q")
    finally:
        hostile.writable_again(ro)
    assert list(ro.iterdir()) == []


def test_failed_run_removes_the_folders_it_made(tiny_models, tmp_path, monkeypatch):
    from llmq import checkpoint

    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(checkpoint, "write_config", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        quantize(tiny_models["llama"], QuantConfig(), tmp_path / "a" / "b" / "q", progress=False)
    assert list(tmp_path.iterdir()) == []


# --- Reading a checkpoint --------------------------------------------------------------------------

def test_header_larger_than_the_format_allows(tmp_path, monkeypatch):
    save_file({"w": torch.zeros(4, 4)}, tmp_path / "model.safetensors")
    monkeypatch.setattr(streaming, "MAX_HEADER_BYTES", 16)
    with pytest.raises(streaming.CorruptCheckpointError, match="header length"):
        streaming.ShardReader(tmp_path)


def test_gap_between_tensors_refused(tmp_path):
    hostile.raw_shard(tmp_path / "model.safetensors", {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, bytes(24))
    with pytest.raises(streaming.CorruptCheckpointError, match="bytes 8-16 of the data belong to no tensor"):
        streaming.ShardReader(tmp_path)


def test_validation_allows_missing_g_idx_and_names_the_layer(tiny_models, tmp_path):
    from safetensors.torch import load_file

    quantize(tiny_models["llama"], QuantConfig(bits=4, group_size=32), tmp_path / "q", progress=False)
    f = tmp_path / "q" / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.g_idx"]  # some writers omit it without act-order
    save_file(tensors, f)
    model = load_quantized(tmp_path / "q")
    assert torch.equal(model.model.layers[1].mlp.up_proj.g_idx, torch.arange(64, dtype=torch.int32) // 32)
    tensors["model.layers.1.mlp.up_proj.scales"][1, 7] = float("inf")
    save_file(tensors, f)
    reader = streaming.ShardReader(tmp_path / "q")
    keys = streaming.KeyMap(model, reader)
    with pytest.raises(streaming.CorruptCheckpointError, match="model.layers.1.mlp.up_proj: 1 of its scales"):
        validate_quantized_layers(model, keys)


# --- Values no grid holds ---------------------------------------------------------------------------

def test_solvers_blame_the_weight():
    w = torch.randn(64, 64)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="weight has NaN or infinite values"):
        rtn_quantize(w, 4, 32, True)
    gptq = GPTQ(64)
    gptq.add_batch(torch.randn(2, 16, 64))
    with pytest.raises(ValueError, match="weight has NaN or infinite values"):
        gptq.solve(w, bits=4, group_size=32, sym=True)


def test_gptq_blames_non_finite_activations():
    x = torch.randn(2, 16, 64)
    x[1, 3, 7] = float("inf")
    with pytest.raises(CalibrationError, match="calibration activations are NaN or infinite"):
        GPTQ(64).add_batch(x)


def test_kept_layer_stays_out_of_gptq(tmp_path):
    """With ``skip_nonfinite`` a NaN linear is left as it is and GPTQ solves the others (the poisoned
    one is the last block's down projection, whose output reaches no later Hessian)."""
    src = save_tiny("llama", tmp_path / "src")
    hostile.edit_tensors(src, lambda t: t["model.layers.1.mlp.down_proj.weight"].__setitem__((0, 0), float("nan")))
    report = quantize(src, QuantConfig(method="gptq", group_size=32, skip_nonfinite=True), tmp_path / "q",
                      calibration=calibration_ids(), progress=False)
    assert list(report.skipped) == ["model.layers.1.mlp.down_proj"]
    assert "has 1 NaN value: left unquantized" in report.skipped["model.layers.1.mlp.down_proj"]
    assert len(report.quantized) == 13
    model = load_quantized(tmp_path / "q")
    assert torch.isnan(model.model.layers[1].mlp.down_proj.weight[0, 0])


def test_interrupted_cli_exits_130_without_traceback(tiny_models, tmp_path):
    """Ctrl-C reaching the command (here raised from inside the run) ends it with status 130 and one line."""
    code = ("import sys\nfrom llmq import checkpoint, cli\n"
            "def interrupt(*a, **k):\n    raise KeyboardInterrupt\n"
            "checkpoint.write_config = interrupt\nsys.exit(cli.main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "quantize", "--model", str(tiny_models["llama"]), "--out",
                        str(tmp_path / "q"), "--method", "rtn"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 130 and "Traceback" not in r.stderr and r.stdout == ""
    assert [ln for ln in r.stderr.splitlines() if ln.strip()][-1].startswith("llmq quantize: interrupted")
    assert list(tmp_path.iterdir()) == []
