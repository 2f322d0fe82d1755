import json
import os
import subprocess
import sys

import pytest

from dpq import artifacts
from dpq.cli import main

FAST = ["--epochs", "1", "--max-train-samples", "64", "--batch-size", "16", "--max-length", "48"]


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_python_m_dpq_help():
    r = subprocess.run([sys.executable, "-m", "dpq", "distill", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--temperature" in r.stdout and "--hidden-weight" in r.stdout


def test_user_mistake_is_one_line_exit_2_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dpq", "teacher", "--model", "x", "--data", str(tmp_path / "none"),
                        "--out", str(tmp_path / "t")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("dpq: error:") and "no such file or folder" in r.stderr
    assert not (tmp_path / "t").exists()


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path, sst2_slice, tiny_models):
    """`dpq run --dry-run | head -1`: stdout is a pipe nobody reads any more."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {sst2_slice}\nteacher: {{model: {tiny_models['teacher']}}}\n")
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before dpq writes: every write fails with EPIPE, deterministically
    try:
        r = subprocess.run([sys.executable, "-m", "dpq", "run", str(recipe), "--out", str(tmp_path / "run"),
                            "--dry-run"], stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


@pytest.mark.parametrize("args, message", [
    (["teacher", "--batch-size", "0"], "teacher.batch_size: must be >= 1"),
    (["distill", "--teacher", "{tmp}/none"], "no finished teacher"),
    (["evaluate", "{tmp}/none"], "no such model folder"),
    (["run", "{tmp}/none.yaml"], "recipe not found"),
])
def test_exit_codes(capsys, tmp_path, sst2_slice, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    if args[0] in ("teacher", "distill"):
        args += ["--out", str(tmp_path / "o"), "--data", str(sst2_slice)]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("dry_run", [True, False])
def test_run_refuses_an_inconsistent_recipe_before_any_stage(capsys, tmp_path, tiny_models, sst2_slice, dry_run):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {sst2_slice}\nteacher: {{model: {tiny_models['teacher']}}}\nquantize: {{bits: 8}}\n")
    code, _, err = run_cli(capsys, "run", recipe, "--out", tmp_path / "run", *(["--dry-run"] if dry_run else []))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "export.precisions: int4 needs quantize.bits" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("missing, extra, export", [("onnx", "onnx", True), ("onnxruntime", "onnx", True),
                                                    ("matplotlib", "report", True), ("onnx", None, False)])
def test_run_names_a_missing_extra_before_any_stage(capsys, monkeypatch, tmp_path, sst2_slice, missing, extra,
                                                    export):
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: importing it raises ImportError
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {sst2_slice}\nexport: {{enabled: {str(export).lower()}}}\n")
    code, _, err = run_cli(capsys, "run", recipe, "--out", tmp_path / "run", "--dry-run")
    if extra is None:  # a recipe without exports does not need the onnx extra
        assert code == 0, err
        return
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"needs {missing}, which is not installed: pip install 'dpq[{extra}]'" in err


def test_teacher_distill_evaluate_end_to_end(capsys, tmp_path, tiny_models, sst2_slice):
    t, s = tmp_path / "teacher", tmp_path / "student"
    code, _, err = run_cli(capsys, "teacher", "--model", tiny_models["teacher"], "--data", sst2_slice, "--out", t,
                           *FAST)
    assert code == 0, err
    assert artifacts.is_complete(t) and not (tmp_path / ".teacher.work").exists()
    first = (t / "manifest.json").read_text()
    code, _, err = run_cli(capsys, "teacher", "--model", tiny_models["teacher"], "--data", sst2_slice, "--out", t,
                           *FAST)
    assert code == 0 and "skipped" in err and (t / "manifest.json").read_text() == first

    code, _, err = run_cli(capsys, "distill", "--teacher", t, "--student", tiny_models["student"], "--data", sst2_slice,
                           "--out", s, "--hidden-weight", "1", "--attention-weight", "1", *FAST)
    assert code == 0, err
    metrics = json.loads((s / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1 and metrics["train_examples"] == 64
    # chosen on the held-out slice of train; dev is measured once, on the saved model
    assert metrics["selected_on"] == "heldout" and 0 <= metrics["selection_accuracy"] <= 1

    code, out, err = run_cli(capsys, "evaluate", t, s, "--data", sst2_slice, "--json", tmp_path / "e.json",
                             "--latency-repeats", "2", "--warmup", "1")
    assert code == 0, err
    rows = json.loads((tmp_path / "e.json").read_text())
    assert [r["name"] for r in rows] == ["teacher", "student"]
    for r in rows:
        assert {"accuracy", "loss", "params", "size_mb", "gflops", "latency_ms_bs1", "latency_ms_bs32"} <= set(r)
        assert r["runtime"] == "torch-fp32" and r["hardware"]["threads"] >= 1
    assert rows[0]["params"] > rows[1]["params"] and rows[0]["gflops"] > rows[1]["gflops"]
    assert rows[1]["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)  # the stage's figure is dev's
    assert "| teacher |" in out

    code, _, err = run_cli(capsys, "distill", "--teacher", t, "--student", tiny_models["student"], "--data", sst2_slice,
                           "--out", tmp_path / "on-dev", "--validation-fraction", "0", *FAST)
    assert code == 0, err
    assert json.loads((tmp_path / "on-dev" / "metrics.json").read_text())["selected_on"] == "dev"


def test_logit_only_distillation_caches_teacher_logits(capsys, tmp_path, tiny_models, sst2_slice, monkeypatch):
    t = tmp_path / "teacher"
    assert run_cli(capsys, "teacher", "--model", tiny_models["teacher"], "--data", sst2_slice, "--out", t,
                   *FAST)[0] == 0
    for i in range(2):
        code, _, err = run_cli(capsys, "distill", "--teacher", t, "--student", tiny_models["student"], "--data",
                               sst2_slice, "--out", tmp_path / f"s{i}", *FAST)
        assert code == 0, err
        assert ("teacher logits from cache" in err) == (i == 1)


def test_teacher_logits_from_the_int8_onnx_teacher_agree_with_torch_and_are_cached(capsys, tmp_path, tiny_models,
                                                                                    sst2_slice, monkeypatch):
    from safetensors.torch import load_file

    t = tmp_path / "teacher"
    assert run_cli(capsys, "teacher", "--model", tiny_models["teacher"], "--data", sst2_slice, "--out", t,
                   *FAST)[0] == 0
    cache = tmp_path / "cache" / "teacher-logits"
    for i, runtime in enumerate(["torch", "onnx-int8", "onnx-int8"]):
        code, _, err = run_cli(capsys, "distill", "--teacher", t, "--student", tiny_models["student"], "--data",
                               sst2_slice, "--out", tmp_path / f"s{i}", "--teacher-logits", runtime, *FAST)
        assert code == 0, err
        assert ("int8 ONNX teacher" in err) == (i == 1)  # built and run once, then read from the cache
    entries = sorted(cache.glob("*.safetensors"))
    (q8,), (fp32,) = ([e for e in entries if e.stem.endswith("-onnx-int8") == q] for q in (True, False))
    a, b = load_file(str(fp32))["logits"], load_file(str(q8))["logits"]
    assert a.shape == b.shape == (64, 2)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9  # int8 rounding moves only near-ties
    assert (a - b).abs().max() <= 0.1 * a.abs().max() + 0.05


def test_run_recipe_skips_unchanged_and_reruns_changed(capsys, tmp_path, tiny_models, sst2_slice):
    recipe = tmp_path / "r.yaml"
    body = f"""
name: tiny
data: {sst2_slice}
teacher: {{model: {tiny_models['teacher']}, epochs: 1, max_train_samples: 48, batch_size: 16}}
baseline: {{epochs: 1, max_train_samples: 48, batch_size: 16}}
distill: {{student: {tiny_models['student']}, epochs: 1, max_train_samples: 48, batch_size: 16, alpha: ALPHA}}
prune: {{epochs: 1, max_train_samples: 48, batch_size: 16, heads: 0.5, ffn: 0.5, update_every: 1}}
quantize: {{methods: [rtn, qat], unpruned_methods: [rtn], group_size: 16, epochs: 1, max_train_samples: 48,
            batch_size: 16, loss_weights: gor}}
export: {{precisions: [int8, int4], accuracy_level: 0}}
evaluate: {{latency_repeats: 1, warmup: 0}}
target: {{max_size_mb: 100}}
"""
    recipe.write_text(body.replace("ALPHA", "0.5"))
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "run", recipe, "--out", run)
    assert code == 0, err
    # the distilled student quantized and exported without pruning too: what pruning buys, side by side
    exports = ["export-int8-pruned", "export-int8-distilled", "export-int4-quantized-rtn", "export-int4-quantized-qat",
               "export-int4-quantized-rtn-unpruned"]
    for name in ["teacher", "baseline", "distilled", "pruned", "quantized-rtn", "quantized-qat",
                 "quantized-rtn-unpruned", *exports, "evaluation"]:
        assert artifacts.is_complete(run / name), name
    assert (run / "recipe.yaml").is_file()
    rows = json.loads((run / "evaluation" / "results.json").read_text())
    assert [r["name"] for r in rows] == ["teacher", "baseline", "distilled", "pruned", *exports]
    assert rows[3]["params"] < rows[2]["params"] and rows[3]["gflops"] < rows[2]["gflops"]
    assert [r["stage"] for r in rows] == ["teacher", "baseline (no KD)", "distill", "prune", "prune → export int8",
                                          "distill → export int8", "quantize rtn → export int4",
                                          "quantize qat → export int4", "quantize rtn (unpruned) → export int4"]
    assert rows[-1]["params"] > rows[-2]["params"] and rows[5]["params"] > rows[4]["params"]
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["rows"][0]["smaller_than_teacher"] == 1.0  # every ratio to the teacher: one place, the report
    assert all(0 <= r["heldout_accuracy"] <= 1 for r in rows)  # the recommendation ranks by it, dev is reported
    assert report["recommendation"]["chosen_on"] == "heldout"
    assert report["recommendation"]["model"] == max(
        (r for r in rows[1:] if r["size_mb"] <= 100),
        key=lambda r: (r["heldout_accuracy"], r["accuracy"], -r["size_mb"]))["name"]
    assert [r["runtime"] for r in rows[3:]] == ["torch-fp32", "onnx-int8", "onnx-int8", "onnx-int4", "onnx-int4",
                                                "onnx-int4"]
    assert rows[6]["gflops"] == rows[3]["gflops"]  # same network, counted from the same structure
    _check_model_cards(run, rows)

    code, out, err = run_cli(capsys, "run", recipe, "--out", run, "--dry-run")
    assert code == 0 and out.count("skip") == 13
    before = {p: p.stat().st_mtime_ns for p in [*run.rglob("*.safetensors"), *run.glob("*/README.md")]}
    code, out, err = run_cli(capsys, "run", recipe, "--out", run)  # the same command again: nothing retrained
    assert code == 0, err
    assert err.count("skipped") == 13  # the cards written after sealing changed no stage's key
    assert {p: p.stat().st_mtime_ns for p in before} == before

    recipe.write_text(body.replace("ALPHA", "0.9"))
    code, out, err = run_cli(capsys, "run", recipe, "--out", run, "--dry-run")
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert lines["teacher"].startswith("skip") and lines["baseline"].startswith("skip")
    assert lines["distill"].startswith("run") and "alpha" in lines["distill"]
    assert lines["prune"].startswith("run")  # downstream of the changed stage
    assert lines["quantize-qat"].startswith("run") and lines["export-int4-quantized-qat"].startswith("run")
    assert lines["evaluate"].startswith("run")


def _check_model_cards(run, rows):
    """Every model folder carries a Hub model card whose numbers are the evaluation's rows, and still verifies."""
    from transformers import AutoModelForSequenceClassification

    from dpq import cards

    by_name = {r["name"]: r for r in rows}
    folders = [d for d in sorted(run.iterdir()) if (d / "manifest.json").is_file()
               and json.loads((d / "manifest.json").read_text())["kind"] in cards.MODEL_KINDS]
    assert {d.name for d in folders} == set(by_name) | {"quantized-rtn", "quantized-qat", "quantized-rtn-unpruned"}
    for d in folders:
        artifacts.verify(d)  # every listed file intact: the card is not one of them
        meta = cards.front_matter((d / "README.md").read_text())
        assert meta["pipeline_tag"] == "text-classification"
        results = meta["model-index"][0]["results"]
        measured = {n: {k: v for k, v in r.items() if k != "model"} for n, r in by_name.items()}
        if d.name in by_name:
            assert meta["dpq"]["evaluation"][d.name] == measured[d.name]
            assert [r["metrics"][0]["value"] for r in results] == [by_name[d.name]["accuracy"]]
            assert results[0]["dataset"]["split"] == "validation"  # the dev split, by the Hub's name
        else:  # a packed folder: measured as its int4 export
            export = f"export-int4-{d.name}"
            assert meta["dpq"]["evaluation"] == {export: measured[export]}
            assert [r["metrics"][0]["value"] for r in results] == [by_name[export]["accuracy"]]
    pruned = cards.front_matter((run / "pruned" / "README.md").read_text())
    assert set(pruned["dpq"]["evaluation"]) == {"pruned", "export-int8-pruned"}  # its own row and its export's
    assert "pruned" in pruned["tags"] and pruned["library_name"] == "transformers"
    model = AutoModelForSequenceClassification.from_pretrained(run / "quantized-qat")  # what QAT sealed loads too
    assert model.config.dpq_quant["method"] == "qat"


def test_run_recipe_reports_the_batch_sizes_it_timed(capsys, tmp_path, tiny_models, sst2_slice):
    """evaluate.batch_sizes other than [1, 32]: ratios and report for the sizes measured (was a KeyError)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
data: {sst2_slice}
teacher: {{model: {tiny_models['teacher']}, epochs: 1, max_train_samples: 32, batch_size: 16}}
baseline: {{enabled: false}}
distill: {{student: {tiny_models['student']}, epochs: 1, max_train_samples: 32, batch_size: 16}}
prune: {{enabled: false}}
quantize: {{enabled: false}}
export: {{enabled: false}}
evaluate: {{latency_repeats: 1, latency_rounds: 1, warmup: 0, batch_sizes: [2, 4]}}
""")
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "run", recipe, "--out", run)
    assert code == 0, err
    rows = json.loads((run / "evaluation" / "results.json").read_text())
    assert "latency_ms_bs4" in rows[1] and "latency_ms_bs1" not in rows[1]
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["rows"][0]["faster_than_teacher_bs2"] == report["rows"][0]["faster_than_teacher_bs4"] == 1.0
    assert {"faster_than_teacher_bs2", "faster_than_teacher_bs4"} <= set(report["rows"][1])
    assert report["figures"] == ["accuracy_vs_size.png", "accuracy_vs_bs2.png", "accuracy_vs_bs4.png"]
    assert "| bs2 ms | bs4 ms |" in (run / "report" / "report.md").read_text()


@pytest.mark.parametrize("importance, allocation", [("combined", "uniform"), ("kd-gradient", "layer-adaptive"),
                                                    ("magnitude", "uniform")])
def test_prune_command_makes_a_smaller_model_that_reloads(capsys, tmp_path, tiny_models, sst2_slice,
                                                          importance, allocation):
    from dpq import load_model

    t = tmp_path / "teacher"
    assert run_cli(capsys, "teacher", "--model", tiny_models["teacher"], "--data", sst2_slice, "--out", t,
                   *FAST)[0] == 0
    s = tmp_path / "student"
    assert run_cli(capsys, "distill", "--teacher", t, "--student", tiny_models["student"], "--data", sst2_slice,
                   "--out", s, *FAST)[0] == 0
    p = tmp_path / "pruned"
    code, _, err = run_cli(capsys, "prune", "--model", s, "--teacher", t, "--data", sst2_slice, "--out", p,
                           "--heads", "0.5", "--ffn", "0.5", "--importance", importance, "--allocation", allocation,
                           "--update-every", "1", *FAST)
    assert code == 0, err
    m = json.loads((p / "metrics.json").read_text())
    assert m["heads_removed"] == pytest.approx(0.5) and m["ffn_removed"] == pytest.approx(0.5)
    model, _ = load_model(p)
    assert sum(x.numel() for x in model.parameters()) == m["params"] < m["params_before"]
    assert (p / "model.safetensors").stat().st_size < (s / "model.safetensors").stat().st_size


@pytest.mark.parametrize("flags, message", [(["--heads", "1.0"], "prune.heads: must be < 1"),
                                            (["--prune-start", "0.8", "--prune-end", "0.2"], "must not be after"),
                                            (["--target-params", "0.9"], "at most")])
def test_prune_bad_values(capsys, tmp_path, tiny_models, sst2_slice, flags, message):
    t = tmp_path / "teacher"
    assert run_cli(capsys, "teacher", "--model", tiny_models["teacher"], "--data", sst2_slice, "--out", t,
                   *FAST)[0] == 0
    code, _, err = run_cli(capsys, "prune", "--model", t, "--teacher", t, "--data", sst2_slice, "--out",
                           tmp_path / "p", *flags, *FAST)
    assert code == 2 and message in err
    assert not (tmp_path / "p").exists()


def test_every_declared_stage_is_a_command_whose_flags_are_its_settings():
    import argparse
    import dataclasses

    from dpq.cli import build_parser
    from dpq.registry import COMMANDS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, stage in COMMANDS.items():
        dests = {a.dest for a in sub.choices[name]._actions}
        for f in dataclasses.fields(stage.settings):
            assert (f.name in dests) == (f.name not in stage.skip), (name, f.name)
        assert {i.name for i in stage.inputs} <= dests and "out" in dests
        assert stage.fanout is None or stage.fanout.name in dests


def test_a_stage_declared_once_is_a_command_that_checks_its_inputs_and_skips_when_unchanged(
        capsys, monkeypatch, tmp_path, tiny_models):
    from dataclasses import dataclass

    from dpq import registry
    from dpq.recipe import opt
    from dpq.stages import require_model

    @dataclass
    class ShoutSettings:
        times: int = opt(1, "how loud", min=1)

    runs = []

    def run(settings, choice, inputs, data, out, key):
        runs.append(settings.times)
        with artifacts.artifact_dir(out, kind="shout", settings=key) as tmp:
            (tmp / "shout.txt").write_text(f"{choice['case']} {settings.times} {inputs['model'].name}")
        return out

    stage = registry.Stage("shout", "a toy stage", ShoutSettings, run,
                           inputs=(registry.Input("model", "a model folder", require_model),),
                           fanout=registry.Fanout("case", lambda: ["upper", "lower"], "which case"),
                           data=False, skip=(), trains=lambda c: False)
    monkeypatch.setitem(registry.COMMANDS, "shout", stage)
    out = tmp_path / "shouted"
    args = ["shout", "--model", tiny_models["student"], "--case", "upper", "--out", out, "--times", "3"]
    assert run_cli(capsys, *args)[0] == 0
    assert (out / "shout.txt").read_text() == f"upper 3 {tiny_models['student'].name}" and runs == [3]
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and runs == [3] and "skipped" in err  # same settings: not run again
    code, _, err = run_cli(capsys, *args[:-1], "0")
    assert code == 2 and "shout.times: must be >= 1" in err and runs == [3]
    code, _, err = run_cli(capsys, "shout", "--model", tmp_path / "none", "--case", "lower", "--out", out)
    assert code == 2 and "no model folder here" in err and runs == [3]
    with pytest.raises(SystemExit):  # argparse refuses a value outside the fan-out's choices
        main(["shout", "--model", str(tmp_path), "--case", "shout", "--out", str(out)])
