"""The README's results tables are exactly what `python evals/report.py` writes from evals/results."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("report", ROOT / "evals" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def test_readme_tables_are_generated_from_the_results():
    text = (ROOT / "README.md").read_text()
    assert report.render_readme(text) == text, "README.md differs from evals/results: run python evals/report.py"


def test_every_results_file_is_in_a_table_and_every_row_has_provenance():
    files = {p.stem for p in (ROOT / "evals" / "results").glob("*.json")}
    read = set()
    original = report.load

    def spy(name):
        read.add(name)
        return original(name)

    report.load = spy
    try:
        for table in report.TABLES.values():
            table()
    finally:
        report.load = original
    assert read == files
    for name in files:
        data = json.loads((ROOT / "evals" / "results" / f"{name}.json").read_text())
        rows = data.get("runs", {}).values() if "runs" in data else data.get("results", [data])
        for row in rows:
            prov = row["provenance"]
            assert "machine" in prov and "commit" in prov, name
            if prov["commit"]:
                assert {"command", "date"} <= set(prov) and prov["command"].startswith("python "), name


def test_results_name_no_absolute_paths():
    for path in (ROOT / "evals" / "results").glob("*.json"):
        text = path.read_text()
        assert '"/' not in text and "site-packages" not in text, path.name  # no path starts a string
        assert not re.search(r"/(?:root|home|tmp|work|opt)/", text), path.name


def test_markers_must_match_the_tables():
    with pytest.raises(ValueError, match="do not match the tables"):
        report.render_readme("<!-- report:smollm2 -->\n<!-- /report:smollm2 -->\n")


def test_labels_come_from_the_quantize_arguments():
    assert report.label({"args": "--nsamples 128 --method rtn --bits 8 --group-size -1 --sym"}) == \
        "RTN int8 per-channel sym"
    assert report.label({"args": "--method gptq --bits 3 --group-size 128 --asym --desc-act --mse "
                                 "--nsamples 256"}) == \
        "GPTQ int3 g128 asym, act-order, `--mse plain`, 256 × 512 calibration tokens"
    assert report.label({"args": ""}) == "GPTQ int4 g128 asym, act-order, `--mse weighted`"
    assert report.label({"args": "--method rtn --mse off"}) == "RTN int4 g128 asym"


def test_labels_name_the_range_search_the_run_used():
    """A row measured before GPTQ's default became the weighted search says what it ran, not today's default."""
    row = {"args": "--method gptq --bits 4", "config": {"meta": {"mse": False}}}
    assert report.label(row) == "GPTQ int4 g128 asym, act-order, `--mse off`"
    assert report.label({**row, "config": {"meta": {"mse": "weighted"}}}).endswith("`--mse weighted`")


def test_a_difference_holds_elsewhere_only_with_its_sign_and_half_its_size(monkeypatch):
    def run(ppl, reference=None):
        row = {"args": "--method gptq --bits 4 --group-size 128 --asym --desc-act --tune",
               "eval": {"perplexity": ppl, "kl_divergence": 0.1}, "quantize_seconds": 10.0}
        row["quantize_seconds"] = 10.0
        return {**row, "reference": reference} if reference else {**row, "args": row["args"][:-7]}

    def text(first_window, gains):  # gains per method name: reference perplexity - method perplexity
        runs = {"ref": run(30.0)}
        runs.update({name: run(30.0 - g, "ref") for name, g in gains.items()})
        return {"corpus": "c (x)", "windows": 40, "first_window": first_window, "tokens": 1, "runs": runs}

    sets = {"smollm2_wikitext": text(0, {"a": 2.0, "b": 2.0, "c": -1.0}),
            "smollm2_wikitext2_w41-80": text(40, {"a": 1.0, "b": 0.9, "c": -0.6}),
            "smollm2_bundled": text(0, {"a": 3.0, "b": 1.5, "c": 0.1})}
    monkeypatch.setattr(report, "load", lambda name: sets[name])
    rows = [line.split(" | ") for line in report.smollm2_elsewhere_table().splitlines()
            if line.startswith("| GPTQ")]
    assert [r[-2] for r in rows] == ["yes", "no", "no"]  # b: 0.9 < 2.0 / 2; c: the sign flips


def test_seed_rows_are_kept_apart_and_grouped_under_their_seed_0_row(monkeypatch):
    """evals/provenance.py puts the rows of seeds other than 0 in their own file, in the configurations'
    order; the seed tables group them under their configuration's seed-0 row."""
    import sys

    sys.path.insert(0, str(ROOT / "evals"))
    try:
        from provenance import by_seed, seed_key
    finally:
        sys.path.remove(str(ROOT / "evals"))
    configs = ["a", "b"]
    runs = {seed_key(n, s): {"n": n, "s": s} for n in ("b", "a", "gone") for s in (2, 0, 1)}
    first, others = by_seed(runs, configs)
    assert list(first) == ["a", "b"] and list(others) == ["a@seed1", "a@seed2", "b@seed1", "b@seed2"]

    def row(ppl):
        return {"args": "--method gptq --bits 4", "quantize_seconds": 1.0,
                "eval": {"perplexity": ppl, "kl_divergence": 0.1, "top1_agreement": 80.0}}

    sets = {"smollm2_wikitext": {"runs": {"a": row(20.0), "b": row(30.0)}},
            "smollm2_wikitext_seeds": {"runs": {"a@seed1": row(21.0), "a@seed2": row(22.0)}}}
    monkeypatch.setattr(report, "load", lambda name: sets[name])
    groups = report.seed_groups("smollm2_wikitext")
    assert [[r["eval"]["perplexity"] for r in g] for g in groups] == [[20.0, 21.0, 22.0]]
    cells = [line.split(" | ") for line in report.smollm2_seeds_table().splitlines() if line.startswith("| GPTQ")]
    assert [c[1:4] for c in cells] == [["20.000 / 21.000 / 22.000", "21.000", "2.000"]]
