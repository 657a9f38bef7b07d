"""End to end on the bundled models (converted once into LLMQ_CACHE): SmolLM2-135M and MiniLM."""

import pytest
import torch
from transformers import AutoTokenizer

from llmq import QuantConfig
from llmq.assets import resolve_model
from llmq.calibration import get_calibration
from llmq.checkpoint import load_model
from llmq.evaluate import compare_lms, evaluate_encoder
from llmq.inspect_ckpt import inspect_checkpoint
from llmq.pipeline import quantize

pytestmark = pytest.mark.slow
WINDOWS = dict(dataset="wikitext2", seqlen=512, max_windows=3, progress=False)


@pytest.fixture(scope="module")
def smollm2():
    return resolve_model("smollm2-135m")


def test_smollm2_rtn_and_gptq_end_to_end(smollm2, tmp_path):
    """RTN int8 stays close to the unquantized model; GPTQ int4 g128 beats RTN int4 g128."""
    runs = {
        "rtn8": QuantConfig(bits=8, group_size=-1),
        "rtn4": QuantConfig(bits=4, group_size=128, sym=False),
        "gptq4": QuantConfig(bits=4, group_size=128, sym=False, method="gptq", desc_act=True),
    }
    for name, config in runs.items():
        quantize(smollm2, config, tmp_path / name, nsamples=16, calib_seqlen=256, progress=False)
    info = inspect_checkpoint(tmp_path / "rtn4")
    assert info["quantized_layers"] == 210 and 4.0 < info["bits_per_weight"] < 4.5
    assert info["quantization_config"]["meta"]["method"] == "rtn"
    calib = inspect_checkpoint(tmp_path / "gptq4")["quantization_config"]["meta"]["calibration"]
    assert calib == {"source": "bundled", "nsamples": 16, "seqlen": 256, "seed": 0, "chat_template": False,
                     "special_tokens": []}
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rtn4")
    res = compare_lms({n: load_model(tmp_path / n) for n in runs}, tokenizer, baseline=load_model(smollm2), **WINDOWS)
    base = res["rtn8"].baseline_perplexity
    assert res["rtn8"].perplexity < base * 1.01
    assert res["rtn8"].top1_agreement > 95
    assert res["gptq4"].perplexity < res["rtn4"].perplexity
    assert res["gptq4"].kl_divergence < res["rtn4"].kl_divergence
    with torch.no_grad():
        out = load_model(tmp_path / "gptq4").generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_minilm_gptq_int8_embeddings(tmp_path):
    src = resolve_model("bert-minilm")
    quantize(src, QuantConfig(bits=8, group_size=128, method="gptq"), tmp_path / "q", nsamples=16,
             calib_seqlen=128, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "q")
    result = evaluate_encoder(load_model(tmp_path / "q"), load_model(src), tokenizer, nsentences=300,
                              progress=False)
    assert result["cosine_mean"] > 0.999
    assert result["top1_agreement"] > 0.9


def test_calibration_samples_are_framed_as_the_tokenizer_frames_text(smollm2):
    """MiniLM's samples start with [CLS] and end with [SEP] (counted in seqlen), with one run of
    the corpus between; SmolLM2's tokenizer adds nothing, so its samples are the bare slices."""
    bert = AutoTokenizer.from_pretrained(resolve_model("bert-minilm"))
    framed = get_calibration(bert, nsamples=6, seqlen=24)
    assert framed.input_ids.shape == (6, 24)
    assert (framed.input_ids[:, 0] == bert.cls_token_id).all() and (framed.input_ids[:, -1] == bert.sep_token_id).all()
    assert framed.describe()["calibration"]["special_tokens"] == [bert.cls_token_id, bert.sep_token_id]
    specials = set(bert.all_special_ids)
    assert not any(t in specials for t in framed.input_ids[:, 1:-1].flatten().tolist())
    with pytest.raises(ValueError, match="no room for text"):
        get_calibration(bert, nsamples=2, seqlen=2)
    plain = get_calibration(AutoTokenizer.from_pretrained(smollm2), nsamples=6, seqlen=24)
    assert plain.input_ids.shape == (6, 24) and plain.describe()["calibration"]["special_tokens"] == []
