"""The interop check's verdicts: derived from GPTQModel's own checkpoints, and able to fail."""

import copy
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("interop_check", ROOT / "scripts" / "interop_check.py")
interop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(interop)


def row(checkpoint: str, writer: str, bits: int, mean: float, loader: str = "gptqmodel", loads: bool = True) -> dict:
    r = {"checkpoint": checkpoint, "writer": writer, "bits": bits, "loader": loader, "loads": loads}
    if loads:
        r.update(mean_abs_dlogit=mean, max_abs_dlogit=20 * mean, top1_agreement=0.99)
    return r


def test_tolerance_is_gptqmodels_gap_on_its_own_checkpoints_in_the_same_arithmetic_and_width():
    rows = [row("own-a", "gptqmodel", 4, 0.06), row("own-b", "gptqmodel", 4, 0.08),
            row("own-b", "gptqmodel", 4, 6.7, loader="transformers"),  # misread: sets no baseline
            row("own-c", "gptqmodel", 8, 0.01), row("own-a", "gptqmodel", 4, 1e-5, loader="gptqmodel-dequant"),
            row("ok", "llmq", 4, 0.1), row("off", "llmq", 4, 0.101), row("off", "llmq", 4, 0.1, loader="transformers"),
            row("int8", "llmq", 8, 0.02), row("int3", "llmq", 3, 0.01),
            row("fp32", "llmq", 4, 1.25e-5, loader="llmq"), row("fp32-off", "llmq", 4, 2e-5, loader="llmq"),
            row("refused", "llmq", 4, 0, loads=False)]
    baselines = interop.verdicts(rows)
    assert set(baselines) == {"gptqmodel", "gptqmodel-dequant"}
    assert baselines["gptqmodel"]["4"]["mean_abs_dlogit"] == 0.08
    assert baselines["gptqmodel"]["4"]["from"] == ["own-a", "own-b"]
    judged = {(r["checkpoint"], r["loader"]): r.get("agrees", "-") for r in rows}
    assert judged[("own-b", "transformers")] is False  # transformers is judged by GPTQModel's kernels' gap
    assert judged[("ok", "gptqmodel")] is True  # 0.1 <= 1.25 * 0.08
    assert judged[("off", "gptqmodel")] is False and "0.101 > 0.1" in rows[6]["why_not"]
    assert judged[("off", "transformers")] is True
    assert judged[("int8", "gptqmodel")] is False  # judged against the int8 baseline, not the int4 one
    assert judged[("int3", "gptqmodel")] is None  # no GPTQModel checkpoint of that width: not judged
    assert judged[("fp32", "llmq")] is True and judged[("fp32-off", "llmq")] is False  # float32 baseline
    assert judged[("refused", "gptqmodel")] == "-"


def test_the_results_file_holds_the_rules_verdicts():
    data = json.loads((ROOT / "evals" / "results" / "interop.json").read_text())
    rows = copy.deepcopy(data["results"])
    assert interop.verdicts(rows) == data["tolerance"]["baselines"]
    assert rows == data["results"] and data["tolerance"]["rule"] == interop.TOLERANCE_RULE
    assert {r["loader"] for r in rows} == set(interop.LOADERS)
    assert {r["checkpoint"] for r in rows} == {*interop.LLMQ_CONFIGS, *interop.GPTQMODEL_CONFIGS}
