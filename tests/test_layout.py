"""The package as a user gets it: the top-level kernels/ folder shadows nothing."""

import os
import subprocess
import sys
from pathlib import Path

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
