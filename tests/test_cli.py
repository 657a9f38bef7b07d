"""The command line: a one-line error for each kind of bad input, and nothing left behind."""

import subprocess
import sys

import pytest
from conftest import save_tiny


def llmq(*args):
    return subprocess.run([sys.executable, "-m", "llmq.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("cli") / "src")


@pytest.mark.parametrize("args,message", [
    (["--model", "no/such/folder/x"], "unknown model"),
    (["--bits", "5"], "bits must be one of"),
    (["--group-size", "0"], "group size must be -1 or a positive whole number"),
    (["--group-size", "-2"], "group size must be -1 or a positive whole number"),
    (["--group-size", "1.5"], "group size must be -1 or a positive whole number"),
])
def test_quantize_errors(src, tmp_path, args, message):
    cmd = ["quantize", "--model", src, "--out", tmp_path / "out", *args]
    r = llmq(*cmd)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_quantize_inspect_eval(src, tmp_path):
    out = tmp_path / "q"
    r = llmq("quantize", "--model", src, "--out", out, "--bits", "4", "--group-size", "32", "--asym")
    assert r.returncode == 0, r.stderr
    assert "14 layers quantized" in r.stdout
    r = llmq("quantize", "--model", src, "--out", out)
    assert r.returncode == 2 and "already exists" in r.stderr
    r = llmq("inspect", out)
    assert r.returncode == 0 and "rtn int4 g32 asym" in r.stdout and "model.layers.1.mlp.down_proj" in r.stdout
    r = llmq("eval", "--model", src)
    assert r.returncode == 2  # the tiny checkpoint has no tokenizer
    r = llmq("inspect", src)
    assert r.returncode == 2 and "not a quantized checkpoint" in r.stderr
