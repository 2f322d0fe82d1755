"""Model cards: Hub metadata from the run's manifests and evaluation rows, written without unsealing a folder."""

from dpq import artifacts, cards
from dpq.pipeline import stage_status

DATA = {"path": "nyu-mll/glue:sst2", "labels": None, "skip_bad_rows": False}


def _artifact(run, name, kind, settings, files=None):
    with artifacts.artifact_dir(run / name, kind=kind, settings=settings) as tmp:
        for f, obj in (files or {"config.json": {"model_type": "bert"}}).items():
            artifacts.write_json_atomic(tmp / f, obj)
        cards.write(tmp, kind=kind, settings=settings, siblings=run, name=name)
    return artifacts.read_manifest(run / name)["settings_hash"]


def _row(name, accuracy, artifact, runtime="torch-fp32"):
    return {"model": f"somewhere/{name}", "name": name, "artifact": artifact, "runtime": runtime, "split": "dev",
            "examples": 872, "accuracy": accuracy, "loss": 0.4, "params": 17_000_000, "size_mb": 70.8,
            "gflops": 0.28, "seq_len": 25, "latency_ms_bs1": 6.6, "latency_ms_bs32": 61.5,
            "hardware": {"cpu": "AMD EPYC", "threads": 2, "cores": 2, "torch": "2.13.0+cpu"}}


def test_cards_follow_the_run_and_carry_its_evaluation(tmp_path):
    run = tmp_path / "sst2-fast"
    teacher = _artifact(run, "teacher", "teacher", {"model": "org/big-teacher", "data": DATA})
    distilled = _artifact(run, "distilled", "distill", {"student": "org/small", "teacher": teacher, "data": DATA})
    pruned_cfg = {"model_type": "dpq-bert", "num_attention_heads": 4, "intermediate_size": 64,
                  "dpq_kept_heads": [[0], [1, 2, 3]], "dpq_ffn_sizes": [20, 40]}
    pruned = _artifact(run, "pruned", "prune", {"model": distilled, "teacher": teacher, "heads": 0.5, "data": DATA},
                       {"config.json": pruned_cfg})
    _artifact(run, "export-int8-pruned", "export", {"model": pruned, "precision": "int8"},
              {"config.json": {"model_type": "bert"}, "export.json": {"runtime": "onnx-int8", "precision": "int8"}})

    sealed = cards.front_matter((run / "pruned" / "README.md").read_text())  # written when the stage sealed
    assert sealed["base_model"] == "org/small" and sealed["datasets"] == ["nyu-mll/glue"]
    assert "model-index" not in sealed and sealed["dpq"]["evaluation"] == {}
    assert "README.md" not in artifacts.read_manifest(run / "pruned")["files"]

    rows = [_row("teacher", 0.91, teacher), _row("distilled", 0.88, "0123456789abcdef"),  # measured, then rebuilt
            _row("pruned", 0.87, pruned), _row("export-int8-pruned", 0.86, None, runtime="onnx-int8")]
    evaluation = {"settings": {"data": DATA}}
    cards.write_run(run, rows, evaluation)

    card = (run / "pruned" / "README.md").read_text()
    meta = cards.front_matter(card)
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0]["value"] == 0.87 and result["dataset"] == {
        "type": "nyu-mll/glue", "name": "sst2", "config": "sst2", "split": "validation"}
    assert set(meta["dpq"]["evaluation"]) == {"pruned", "export-int8-pruned"}  # its own row and its export's
    assert meta["dpq"]["evaluation"]["pruned"] == {k: v for k, v in rows[2].items() if k != "model"}
    assert "heads per layer [1, 3]" in card and "trust_remote_code=True" in card and "| 6.6 | 61.5 |" in card
    teacher_meta = cards.front_matter((run / "teacher" / "README.md").read_text())
    assert teacher_meta["base_model"] == "org/big-teacher" and "trust_remote_code" not in (
        run / "teacher" / "README.md").read_text()
    # a row measured on an earlier build of the folder stays out of its card
    assert "model-index" not in cards.front_matter((run / "distilled" / "README.md").read_text())

    for name in ("teacher", "distilled", "pruned", "export-int8-pruned"):
        artifacts.verify(run / name)  # nothing listed changed
    manifest = artifacts.read_manifest(run / "pruned")
    assert stage_status(run / "pruned", manifest["settings"]) == (False, "complete, settings unchanged")


def test_a_card_is_not_rewritten_when_nothing_changed(tmp_path):
    run = tmp_path / "run"
    h = _artifact(run, "teacher", "teacher", {"model": "org/t", "data": {"path": str(tmp_path)}})
    cards.write_run(run, [_row("teacher", 0.9, h)], None)
    card = run / "teacher" / "README.md"
    before = card.stat().st_mtime_ns
    cards.write_run(run, [_row("teacher", 0.9, h)], None)
    assert card.stat().st_mtime_ns == before
    meta = cards.front_matter(card.read_text())
    assert "datasets" not in meta  # a local data folder is no hub dataset
    assert meta["model-index"][0]["results"][0]["dataset"]["type"] == tmp_path.name
