import json
import sys

import pytest

from dpq import artifacts, load
from dpq.cli import main
from dpq.errors import DpqError
from dpq.report import pareto


def cli(capsys, *args):
    code = main([str(a) for a in args])
    return code, *capsys.readouterr()


def _row(name, runtime, acc, size, l1, l32):
    return {"name": name, "runtime": runtime, "accuracy": acc, "params": 1_000_000, "size_mb": size, "gflops": 0.5,
            "latency_ms_bs1": l1, "latency_ms_bs32": l32, "hardware": {"cpu": "test", "threads": 2}}


def test_pareto_front():
    rows = [_row("teacher", "torch-fp32", 0.91, 400, 50, 700), _row("a", "onnx-int8", 0.88, 20, 3, 40),
            _row("b", "onnx-int4", 0.87, 25, 4, 50), _row("c", "onnx-int4", 0.86, 8, 4, 45)]
    assert pareto(rows, "size_mb") == ["teacher", "a", "c"]  # b: a is more accurate and smaller
    assert pareto(rows, "latency_ms_bs32") == ["teacher", "a"]


def test_stage_names_come_from_the_plan(tmp_path):
    from dpq.recipe import Recipe
    from dpq.registry import plan

    labels = {s.out.name: s.label for s in plan(Recipe(), tmp_path, data=lambda: None)}
    assert labels["export-int4-quantized-qat"] == "quantize qat → export int4"
    assert labels["export-int8-pruned"] == "prune → export int8"
    assert labels["baseline"] == "baseline (no KD)"


def test_report_writes_table_json_and_plots(capsys, tmp_path):
    run = tmp_path / "run"
    (run / "evaluation").mkdir(parents=True)
    rows = [_row("teacher", "torch-fp32", 0.91, 400, 50, 700), _row("distilled", "torch-fp32", 0.89, 90, 8, 90),
            _row("export-int4-quantized-qat", "onnx-int4", 0.88, 7, 3, 40)]
    rows[-1]["stage"] = "quantize qat → export int4"  # the evaluation writes each row's stage name from the plan
    (run / "evaluation" / "results.json").write_text(json.dumps(rows))
    code, out, err = cli(capsys, "report", run)
    assert code == 0, err
    rep = run / "report"
    assert artifacts.is_complete(rep) and out.strip().endswith("report.md")
    data = json.loads((rep / "report.json").read_text())
    last = data["rows"][-1]
    assert last["smaller_than_teacher"] == pytest.approx(400 / 7, rel=1e-2)
    assert last["faster_than_teacher_bs32"] == pytest.approx(700 / 40, rel=1e-2)
    assert last["stage"] == "quantize qat → export int4"
    md = (rep / "report.md").read_text()
    assert "| export-int4-quantized-qat ★ |" in md and "-3.0 pt" in md
    for f in data["figures"]:
        assert (rep / f).stat().st_size > 1000


def test_report_uses_the_batch_sizes_measured(capsys, tmp_path):
    run = tmp_path / "run"
    (run / "evaluation").mkdir(parents=True)
    rows = [_row("teacher", "torch-fp32", 0.91, 400, 50, 700), _row("distilled", "torch-fp32", 0.89, 90, 8, 90)]
    for r in rows:  # timed at batch 4 and 64 only
        r["latency_ms_bs4"], r["latency_ms_bs64"] = r.pop("latency_ms_bs1"), r.pop("latency_ms_bs32")
    (run / "evaluation" / "results.json").write_text(json.dumps(rows))
    code, _, err = cli(capsys, "report", run)
    assert code == 0, err
    data = json.loads((run / "report" / "report.json").read_text())
    assert data["rows"][1]["faster_than_teacher_bs4"] == pytest.approx(50 / 8, rel=1e-2)
    assert data["rows"][1]["faster_than_teacher_bs64"] == pytest.approx(700 / 90, rel=1e-2)
    assert set(data["pareto"]) == {"size_mb", "latency_ms_bs4", "latency_ms_bs64"}
    md = (run / "report" / "report.md").read_text()
    assert "| bs4 ms | bs64 ms | × smaller | × faster bs4 | × faster bs64 |" in md and "bs32" not in md


def test_report_without_matplotlib_names_the_extra(capsys, tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "evaluation").mkdir(parents=True)
    (run / "evaluation" / "results.json").write_text(json.dumps([_row("teacher", "torch-fp32", 0.91, 400, 50, 700)]))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = cli(capsys, "report", run)
    assert code == 2 and "pip install 'dpq[report]'" in err and not (run / "report").exists()


def test_report_without_evaluation_is_refused(capsys, tmp_path):
    code, _, err = cli(capsys, "report", tmp_path)
    assert code == 2 and "evaluation/results.json" in err


def _target_run(tmp_path, target: dict | None):
    run = tmp_path / "run"
    (run / "evaluation").mkdir(parents=True)
    rows = [_row("teacher", "torch-fp32", 0.91, 400, 60, 800), _row("distilled", "torch-fp32", 0.90, 90, 8, 90),
            _row("int8-unpruned", "onnx-int8", 0.895, 23, 2.0, 30), _row("int8-pruned", "onnx-int8", 0.89, 18, 1.9, 20),
            _row("int4-pruned", "onnx-int4", 0.885, 7.6, 2.5, 30), _row("int4-gptq", "onnx-int4", 0.87, 7.6, 1.7, 20)]
    (run / "evaluation" / "results.json").write_text(json.dumps(rows))
    if target is not None:
        (run / "recipe.yaml").write_text(json.dumps({"name": "x", "target": target}))  # JSON is YAML
    return run


@pytest.mark.parametrize("target, flags, pick, says", [
    # size and speed: the two 7.6 MB files qualify; the more accurate one is named
    ({"max_size_mb": 8, "min_speedup_bs1": 20, "min_speedup_bs32": 20}, [], "int4-pruned", "**Ship `int4-pruned`**"),
    # the command's flags replace the recipe's bounds: 25x at batch 1 only int4-gptq reaches (60 / 1.7 = 35x)
    ({"max_size_mb": 8, "min_speedup_bs1": 20}, ["--min-speedup-bs1", "25"], "int4-gptq", "the 1 models"),
    # no size bound: the most accurate fast-enough model, unpruned int8
    ({"min_speedup_bs1": 20, "min_speedup_bs32": 20}, [], "int8-unpruned", "**Ship `int8-unpruned`**"),
])
def test_report_recommends_the_most_accurate_model_meeting_the_target(capsys, tmp_path, target, flags, pick, says):
    run = _target_run(tmp_path, target)
    code, _, err = cli(capsys, "report", run, *flags)
    assert code == 0, err
    rec = json.loads((run / "report" / "report.json").read_text())["recommendation"]
    assert rec["model"] == pick and pick in rec["meets"]
    assert says in (run / "report" / "report.md").read_text()


def test_report_recommends_by_held_out_accuracy_when_every_row_has_it(capsys, tmp_path):
    run = _target_run(tmp_path, {"max_size_mb": 8, "min_speedup_bs1": 20, "min_speedup_bs32": 20})
    rows = json.loads((run / "evaluation" / "results.json").read_text())
    held = {"teacher": 0.93, "distilled": 0.92, "int8-unpruned": 0.915, "int8-pruned": 0.91, "int4-pruned": 0.90,
            "int4-gptq": 0.905}  # int4-gptq: less accurate on dev (0.87 vs 0.885), more on the held-out slice
    for r in rows:
        r["heldout_accuracy"] = held[r["name"]]
    (run / "evaluation" / "results.json").write_text(json.dumps(rows))
    assert cli(capsys, "report", run)[0] == 0
    rec = json.loads((run / "report" / "report.json").read_text())["recommendation"]
    assert rec["model"] == "int4-gptq" and rec["chosen_on"] == "heldout"
    md = (run / "report" / "report.md").read_text()
    assert "the most accurate on the held-out slice of train (0.9050" in md and "| 0.8700 | 0.9050 |" in md

    rows[-1].pop("heldout_accuracy")  # one row without it: dev decides, as for rows measured before the slice
    (run / "evaluation" / "results.json").write_text(json.dumps(rows))
    assert cli(capsys, "report", run)[0] == 0
    rec = json.loads((run / "report" / "report.json").read_text())["recommendation"]
    assert rec["model"] == "int4-pruned" and rec["chosen_on"] == "dev"


def test_report_says_by_how_much_no_model_meets_the_target(capsys, tmp_path):
    run = _target_run(tmp_path, {"max_size_mb": 5, "min_speedup_bs32": 20})
    assert cli(capsys, "report", run)[0] == 0
    rec = json.loads((run / "report" / "report.json").read_text())["recommendation"]
    assert rec["model"] is None and rec["closest"] == "int4-pruned"  # only its size misses, by 2.6 MB
    assert rec["misses"] == {"max_size_mb": {"value": 7.6, "bound": 5}}
    md = (run / "report" / "report.md").read_text()
    assert "**No model meets the target**" in md and "has 7.6 MB" in md


def test_report_without_a_target_recommends_nothing_and_bad_bounds_are_refused(capsys, tmp_path):
    run = _target_run(tmp_path, None)
    assert cli(capsys, "report", run)[0] == 0
    assert json.loads((run / "report" / "report.json").read_text())["recommendation"]["model"] is None
    assert "No `target:` in the recipe" in (run / "report" / "report.md").read_text()
    code, _, err = cli(capsys, "report", run, "--max-size-mb", "-1")
    assert code == 2 and "target.max_size_mb" in err
    (run / "recipe.yaml").write_text(json.dumps({"target": {"min_speedup_bs4": 3}}))
    code, _, err = cli(capsys, "report", run)
    assert code == 2 and "min_speedup_bs4" in err and len(err.strip().splitlines()) == 1


def test_recipe_target_must_name_timed_batch_sizes(tmp_path):
    from dpq.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("target: {min_speedup_bs32: 20}\nevaluate: {batch_sizes: [1, 8]}\n")
    with pytest.raises(DpqError, match="batch 32 is not timed"):
        load_recipe(path)


@pytest.fixture
def exported(capsys, tmp_path, tiny_models, sst2_slice):
    q = tmp_path / "q"
    assert cli(capsys, "quantize", "--method", "rtn", "--model", tiny_models["student"], "--data", sst2_slice,
               "--out", q, "--group-size", "16")[0] == 0
    e = tmp_path / "e"
    assert cli(capsys, "export", "--model", q, "--out", e, "--precision", "int4", "--accuracy-level", "0")[0] == 0
    return q, e


def test_predict_torch_and_onnx_agree_and_survive_hostile_text(exported):
    q, e = exported
    texts = ["a charming and moving film", "", "x" * 100_000, "bell\x07\x00 tab\t ünïcødé 🎬 \u202e", "dull " * 2000]
    a, b = load(q).predict(texts), load(e).predict(texts)
    assert [p.label for p in a] == [p.label for p in b]
    assert all(abs(p.probability - r.probability) < 1e-3 and 0.5 <= p.probability <= 1 for p, r in zip(a, b))
    assert [p.truncated for p in a] == [False, False, False, False, True]  # 100k x's are one (unknown) word
    with pytest.raises(DpqError, match="text 2 is a int"):
        load(q).predict(["ok", 3])


def test_onnx_folder_without_onnxruntime_names_the_extra(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(DpqError, match=r"needs onnxruntime, which is not installed: pip install 'dpq\[onnx\]'"):
        load(exported[1])


def test_predict_cli_texts_file_and_mistakes(capsys, tmp_path, exported):
    q, e = exported
    code, out, err = cli(capsys, "predict", e, "great fun", "awful")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[2] == "great fun"
    f = tmp_path / "in.txt"
    f.write_text("one\n\ntwo\n")
    code, out, _ = cli(capsys, "predict", q, "--file", f, "--json")
    assert code == 0 and [json.loads(l)["text"] for l in out.splitlines()] == ["one", "two"]
    f.write_bytes(b"fine\n\xff\xfe bad\n")
    code, _, err = cli(capsys, "predict", q, "--file", f)
    assert code == 2 and "line 2 is not UTF-8" in err
    code, _, err = cli(capsys, "predict", tmp_path / "nothing", "hi")
    assert code == 2 and "no such model folder" in err
    code, _, err = cli(capsys, "predict", q)
    assert code == 2 and "nothing to classify" in err
