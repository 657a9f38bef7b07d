"""The command line: a one-line error for each kind of bad input, and nothing left behind."""

import json
import os
import subprocess
import sys

import pytest
import torch
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
    (["--tune-steps", "5"], "--tune-steps needs --tune"),
    (["--mse", "hessian"], "mse must be 'weighted', 'plain' or 'off'"),
    (["--tune", "--tune-steps", "-1"], "tune steps must be >= 0"),
    (["--e2e-epochs", "2"], "--e2e-epochs needs --e2e"),
    (["--e2e-lr", "1e-3"], "--e2e-lr needs --e2e"),
    (["--e2e", "--e2e-lr", "0"], "end-to-end tuning learning rate must be positive"),
    (["--e2e-batch", "2"], "--e2e-batch needs --e2e"),
    (["--e2e", "--e2e-batch", "0"], "end-to-end tuning batch must be >= 1"),
    (["--e2e-rounding"], "--e2e-rounding needs --e2e"),
    (["--e2e-embedding"], "--e2e-embedding needs --e2e"),
    (["--e2e", "--e2e-embedding"], "--e2e-embedding is for encoders (sentence embeddings)"),
    (["--e2e", "--e2e-epochs", "0"], "end-to-end tuning epochs must be positive"),
    (["--qep", "--method", "rtn"], "--qep needs --method gptq, without --tune or --awq"),
    (["--qep", "--tune"], "--qep needs --method gptq, without --tune or --awq"),
    (["--qep", "-1"], "--qep strength must be positive"),
])
def test_quantize_errors(src, tmp_path, args, message):
    cmd = ["quantize", "--model", src, "--out", tmp_path / "out", *args]
    r = llmq(*cmd)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_quantize_defaults_are_the_best_int4_configuration():
    """`llmq quantize --model M --out O` is GPTQ int4 g128 on an asymmetric grid with act-order and the
    weighted range search; `--method rtn` keeps RTN's min/max grid."""
    from llmq.cli import build_parser
    from llmq.config import QuantConfig

    def config(*argv):
        args = build_parser().parse_args(["quantize", "--out", "o", *argv])
        return QuantConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, method=args.method,
                           desc_act=args.desc_act, mse=args.mse)

    assert config().describe() == "gptq int4 g128 asym act-order weighted mse"
    assert config("--method", "rtn").describe() == "rtn int4 g128 asym"
    assert config("--mse").mse is True and config("--mse", "plain").mse is True
    assert config("--mse", "off").mse is False and config("--method", "rtn", "--mse", "weighted").mse == "weighted"
    assert build_parser().parse_args(["quantize", "--out", "o", "--sym"]).sym
    assert build_parser().parse_args(["quantize", "--out", "o"]).qep == 0  # off
    assert build_parser().parse_args(["quantize", "--out", "o", "--qep"]).qep == 0.5
    assert build_parser().parse_args(["quantize", "--out", "o", "--qep", "1"]).qep == 1


def test_seed_draws_the_calibration_and_the_tuning_order(src, tmp_path, monkeypatch):
    """`--seed` reaches the calibration draw and the sample order of --tune and --e2e alike."""
    from llmq import cli, pipeline

    class Called(Exception):
        pass

    seen = {}

    def quantize(model, config, out, **kwargs):
        seen.update(kwargs)
        raise Called

    monkeypatch.setattr(pipeline, "quantize", quantize)
    with pytest.raises(Called):
        cli.main(["quantize", "--model", str(src), "--out", str(tmp_path / "q"), "--tune", "--e2e", "--seed", "3"])
    assert (seen["seed"], seen["tune"].seed, seen["e2e"].seed) == (3, 3, 3)


def test_quantize_inspect_eval(src, tmp_path):
    out = tmp_path / "q"
    r = llmq("quantize", "--model", src, "--out", out, "--method", "rtn", "--bits", "4", "--group-size", "32")
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


def test_group_fit_head_and_the_files_own_config(src, tmp_path):
    """The CLI says when it changes the group size, quantizes the head on request, and ``inspect``
    shows the file's quantization_config and producer as written, not llmq's defaults."""
    out = tmp_path / "fit"
    r = llmq("quantize", "--model", src, "--out", out, "--method", "rtn", "--group-size", "96", "--asym",
             "--quantize-head", "8")
    assert r.returncode == 0, r.stderr
    assert "group size 96 -> 64: 15 of 15 quantized layers" in r.stdout and "15 layers quantized" in r.stdout
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["format"], qc["group_size"], qc["lm_head"]) == ("gptq_v2", 64, True)
    assert config["tie_word_embeddings"] is False
    qc.update(meta={"quantizer": ["gptqmodel:7.6.0"], "damp_percent": 0.05})  # as another tool writes it
    qc.pop("damp_percent")
    (out / "config.json").write_text(json.dumps(config))
    r = llmq("inspect", out)
    assert r.returncode == 0, r.stderr
    assert "written by ['gptqmodel:7.6.0']" in r.stdout and '"damp_percent": 0.05' in r.stdout
    assert "llmq:" not in r.stdout and '"damp_percent": 0.01' not in r.stdout and "lm_head" in r.stdout


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_quantize_command_keeps_triton_out(src, tmp_path, interpret):
    """Without CUDA the console command quantizes without loading Triton, which torch._dynamo (imported
    by transformers) would otherwise load; TRITON_INTERPRET=1 (Triton on the CPU) keeps it."""
    code = ("import runpy, sys\n"
            "try:\n    runpy.run_module('llmq.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('triton', sys.modules.get('triton') is not None, 'dynamo', 'torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, "quantize", "--model", str(src), "--out", str(tmp_path / "q"),
                        "--method", "rtn"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": interpret})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "q" / "config.json").exists()
    loaded = interpret == "1" or torch.cuda.is_available()
    assert r.stdout.splitlines()[-1] == f"triton {loaded} dynamo True", r.stdout


def test_weights_of_another_architecture_are_a_one_line_error(src, tmp_path):
    """A config.json naming an architecture whose linears the weights do not hold (Llama weights
    under a Mamba config): one line naming the missing tensor, before any work, nothing written."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"],
                                                 "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 128}))
    r = llmq("quantize", "--model", bad, "--out", tmp_path / "out", "--method", "rtn", "--skip-unpackable")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "has no tensor for" in lines[0] and "mixer" in lines[0]
    assert not (tmp_path / "out").exists()
