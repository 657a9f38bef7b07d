"""The package as a user gets it: the top-level kernels/ folder shadows nothing, a wheel carries
the kernels and the evaluation corpus, and the corpus is checked when read."""

import lzma
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from llmq import evaluate

ROOT = Path(__file__).resolve().parents[1]

# Run from the repository root, where the root is on sys.path (as under `python -m pytest` or
# `python -c`): `import kernels` must be the hub package transformers imports (or, where it is not
# installed, not a module of ours), and a model must still load and run through transformers.
NO_SHADOW = """
import sys
import kernels
from pathlib import Path
assert sys.path[0] in ("", str(Path.cwd())), sys.path[:2]
ours = Path.cwd() / "kernels"
origin = getattr(kernels, "__file__", None)
assert origin is None or not Path(origin).resolve().is_relative_to(ours), origin
from transformers.integrations import hub_kernels  # noqa: F401  (fails when kernels is shadowed)
import torch, transformers
from llmq.kernels import quant_matmul, reference  # noqa: F401
config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1)
model = transformers.AutoModelForCausalLM.from_config(config)
model.save_pretrained(sys.argv[1])
loaded = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
print("ok", tuple(loaded(torch.tensor([[1, 2, 3]])).logits.shape))
"""


def test_kernels_folder_shadows_no_package_from_the_repository_root(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", NO_SHADOW, str(tmp_path / "tiny")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[-1] == "ok (1, 3, 64)"
    assert not (ROOT / "kernels" / "__init__.py").exists()


WHEEL_CHECK = """
import llmq, llmq.kernels, llmq.kernels.cpu_build
from pathlib import Path
from llmq.evaluate import load_eval_text
assert Path(llmq.__file__).is_relative_to(Path.cwd()), llmq.__file__
assert llmq.kernels.cpu_build.SOURCE.is_file()
text, label = load_eval_text("wikitext2")
print(label, len(text))
"""


def test_wheel_carries_the_kernels_and_the_evaluation_corpus(tmp_path):
    """A built wheel, unpacked and imported from outside the repository, evaluates offline."""
    src = tmp_path / "src"  # setuptools builds in the source tree: build a copy
    for part in ("llmq", "kernels"):
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, src / part)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("llmq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("llmq/kernels/__init__.py", "llmq/kernels/cpu.py", "llmq/kernels/triton_gemm.py",
                 "llmq/kernels/csrc/cpu_quant.cpp", "llmq/data/wiki.test.raw.xz", "llmq/data/README.md"):
        assert name in names, name
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    r = subprocess.run([sys.executable, "-c", WHEEL_CHECK], cwd=site, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    # 1,288,513 characters, less the CR of each of the 2,891 CRLF line endings
    assert r.stdout.split() == ["wikitext-2-raw", "test", "(wiki.test.raw)", "1285622"]


def test_wikitext2_is_shipped_and_its_checksum_is_checked(tmp_path):
    text, label = evaluate.load_eval_text("wikitext2")
    assert label == evaluate.WIKITEXT2_LABEL
    assert text.startswith(" = Robert Boulter = \n Robert Boulter is an English film") and "\r" not in text
    assert text.count("\n") == 2891
    damaged = tmp_path / "wiki.test.raw.xz"
    damaged.write_bytes(lzma.compress(text.encode()))  # right text, wrong bytes: LF line endings
    with pytest.raises(ValueError, match="wiki.test.raw.xz is damaged: its text has SHA-256"):
        evaluate.wikitext2_text(damaged)


def test_unknown_dataset_is_one_line_error():
    with pytest.raises(FileNotFoundError, match="is not 'wikitext2', 'bundled', 'hf:NAME"):
        evaluate.load_eval_text("no-such-corpus")
