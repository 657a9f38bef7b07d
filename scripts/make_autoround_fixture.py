"""Write ``tests/data/autoround_tiny``: a tiny random Llama and its AutoRound export in the
``auto_round:auto_gptq`` packing (``quant_method: auto-round``), which ``tests/test_interop_format.py``
reads with llmq. One layer is left unquantized and one is at 8 bits through AutoRound's per-layer
``layer_config`` (written as its ``extra_config``).

Runs in an environment with ``auto-round`` installed (see ``evals/autoround_smollm2.py``), from the
repository root:

    .venv-autoround/bin/python scripts/make_autoround_fixture.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import tokenizers
import torch
import transformers

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "autoround_tiny"


def main() -> None:
    import auto_round

    shutil.rmtree(OUT, ignore_errors=True)
    source = OUT / "source"
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.to(torch.float16).save_pretrained(source)
    # AutoRound wants a tokenizer beside the model, even with token ids for calibration: one token per id.
    vocab = tokenizers.models.WordLevel({str(i): i for i in range(256)}, unk_token="0")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(vocab), unk_token="0",
                                         pad_token="1").save_pretrained(source)
    calibration = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    layers = {"model.layers.1.mlp.down_proj": {"bits": 16}, "model.layers.0.self_attn.o_proj": {"bits": 8}}
    ar = auto_round.AutoRound(str(source), bits=4, group_size=32, sym=False, iters=20,
                              dataset=list(calibration.split(1)), nsamples=8, seqlen=32, layer_config=layers,
                              device_map="cpu", enable_torch_compile=False)
    scratch = OUT / "scratch"
    ar.quantize_and_save(str(scratch), format="auto_round:auto_gptq")
    [written] = [c.parent for c in scratch.rglob("config.json")]
    shutil.move(str(written), OUT / "quantized")
    shutil.rmtree(scratch, ignore_errors=True)
    qc = json.loads((OUT / "quantized" / "config.json").read_text())["quantization_config"]
    print(json.dumps(qc, indent=1))


if __name__ == "__main__":
    main()
