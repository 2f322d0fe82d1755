"""Recipes that lie, signals from schedulers, full disks and hostile text (issue 24, items 10-13): every one ends in
one line, exit 2 for a user's mistake, with earlier results intact. The CLI cases run in real processes."""

import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import wait_for_step

from dpq import artifacts, cards
from dpq.cli import main
from dpq.errors import DpqError
from dpq.recipe import MAX_YAML_NODES, load_recipe

DPQ = [sys.executable, "-m", "dpq"]
# a tiny model's stage: seconds, with a checkpoint every 2 steps so a signal always finds one to write
TRAIN = ["--batch-size", "2", "--max-length", "32", "--checkpoint-every", "2", "--lr", "1e-3"]

BOMB = "".join(f"{a}: &{a} [{', '.join([f'*{p}' if p else 'x'] * 9)}]\n"
               for p, a in zip([None, *"abcdefgh"], "abcdefghi"))  # 9^9 values from 300 bytes


def dpq(*args, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*DPQ, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


def one_error_line(r: subprocess.CompletedProcess, *words: str) -> str:
    """The process ended with exit 2 and one stderr line naming the problem (no traceback before it)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("dpq: error: "), r.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, DPQ_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def finished_teacher(tmp_path_factory, tiny_models, sst2_slice):
    """One `dpq teacher` run (a single-stage command), shared by the tests that read or must keep it."""
    root = tmp_path_factory.mktemp("finished")
    out = root / "run" / "teacher"
    r = dpq("teacher", "--model", tiny_models["student"], "--data", sst2_slice, "--out", out, "--epochs", "1", *TRAIN,
            env=dict(os.environ, DPQ_CACHE=str(root / "cache"), OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# ----------------------------------------------------------------------------- item 10: recipes


@pytest.mark.parametrize("text, message", [
    ("prune: {prune_start: .nan}\n", "prune.prune_start: expected a finite number, got nan"),
    ("distill: {alpha: .nan}\n", "distill.alpha: expected a finite number"),
    ("distill: {temperature: .inf}\n", "distill.temperature: expected a finite number, got inf"),
    ("target: {max_size_mb: -.inf}\n", "target.max_size_mb: expected a finite number"),
    ("teacher: {lr: 1e999}\n", "teacher.lr: expected a finite number"),  # YAML reads it as text, float() as inf
    ("teacher: {epochs: 100000000000000000000000000}\n", "teacher.epochs: must be <= 1000"),
    ("teacher: {batch_size: 1000000}\n", "teacher.batch_size: must be <= 65536"),
    ("teacher: {max_length: 1000000}\n", "teacher.max_length: must be <= 8192"),
    ("distill: {seed: 123456789012345678901234}\n", "distill.seed: must be <= 4294967295"),
    ("distill: {seed: -1}\n", "distill.seed: must be >= 0"),
    ("data: {validation_seed: 4294967296}\n", "data.validation_seed: must be <= 4294967295"),
    ("quantize: {calibration_samples: 10000000000}\n", "quantize.calibration_samples: must be <="),
    ("evaluate: {batch_sizes: [1, 1000000]}\n", "evaluate.batch_sizes: a list of integers >= 1 and <= 65536"),
    ("distill: {layer_map: [1, .nan]}\n", "layer_map: a list of teacher layers"),
    ('teacher: {epochs: "--5"}\n', "teacher.epochs: expected an integer, got '--5'"),
    ('teacher: {epochs: "²"}\n', "teacher.epochs: expected an integer"),
    ("teacher: {1: 2}\n", "line 1: '1' is not a name"),
    ("teacher:\n  epochs: 2\n  yes: 3\n", "line 3: 'yes' is not a name"),  # YAML 1.1 reads yes as true
    ("? [a, b]\n: 1\n", "a sequence is not a name"),
    ("profiles: [fast, full]\n", "profiles: a mapping of profile names to sections"),
    ("data: {labels: [{a: 1}, b]}\n", "data.labels: class names are text or integers"),
    ("teacher: {seed: 2024-13-01}\n", "not valid YAML (month must be in 1..12"),
    ("", "holds no settings; it would run the whole default chain"),
    ("# only a comment\n", "holds no settings"),
    (BOMB, f"holds more than {MAX_YAML_NODES} values once its YAML aliases are expanded"),
    ("a: &a [*a]\n", "an alias refers to the value that contains it"),
    ("teacher: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 32 levels"),
    ("name: /etc\n", "name: '/etc' holds a path separator"),
    ("name: ../../elsewhere\n", "holds a path separator"),
    ("name: ..\n", "name: '..' starts with a dot"),
    ("name: .hidden\n", "starts with a dot"),
    ("name: ''\n", "name: '' is empty"),
    ("name: [a]\n", "name: expected a plain name"),
    ("name: \"a\\x1bb\"\n", "holds a control character"),
])
def test_a_bad_recipe_is_one_error_at_load(tmp_path, text, message):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    start = time.monotonic()
    with pytest.raises(DpqError) as e:
        load_recipe(p)
    assert message in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 300
    assert time.monotonic() - start < 2  # the alias bomb is measured on YAML's node graph, never expanded


def test_recipe_profiles_and_file_size_are_checked(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("teacher: {epochs: 2}\nprofiles:\n  fast: [1]\n  ../up: {teacher: {epochs: 1}}\n")
    with pytest.raises(DpqError, match=r"profiles\.fast: expected a mapping of sections"):
        load_recipe(p, "fast")
    with pytest.raises(DpqError, match="profile: '../up' holds a path separator"):  # it names the run folder
        load_recipe(p, "../up")
    p.write_text("teacher: {epochs: 2}\n" + "# padding\n" * 30_000)
    with pytest.raises(DpqError, match="a recipe is at most"):
        load_recipe(p)
    # aliases within the limits are YAML like any other, and each section gets its own copy
    p.write_text("teacher: &train {epochs: 2, seed: 7}\ndistill: {<<: *train, alpha: 0.3}\nbaseline: *train\n")
    r = load_recipe(p)
    assert (r.teacher.epochs, r.distill.seed, r.distill.alpha, r.baseline.seed, r.name) == (2, 7, 0.3, 7, "r")


def test_bad_recipes_in_real_processes_are_one_line_and_write_nothing(tmp_path, env):
    cases = {"nan.yaml": ("prune: {prune_start: .nan}\n", "prune.prune_start: expected a finite number"),
             "bomb.yaml": (BOMB, "YAML aliases")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        start = time.monotonic()
        one_error_line(dpq("run", name, "--dry-run", cwd=tmp_path, env=env, timeout=120), name, message)
        assert time.monotonic() - start < 60
    # without --dry-run too: refused at load, before any folder (here it would be ../../escaped) is made
    (tmp_path / "up.yaml").write_text("name: ../../escaped\ndata: nowhere\n")
    one_error_line(dpq("run", "up.yaml", cwd=tmp_path, env=env), "up.yaml: name: '../../escaped' holds a path")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*cases, "up.yaml"])
    assert not (tmp_path.parent.parent / "escaped").exists()


# ----------------------------------------------------------------------------- item 11: SIGTERM


def test_sigterm_checkpoints_says_how_to_resume_and_the_rerun_finishes(tmp_path, tiny_models, sst2_slice, env):
    out = tmp_path / "t"
    cmd = [*DPQ, "teacher", "--model", str(tiny_models["student"]), "--data", str(sst2_slice), "--out", str(out),
           "--epochs", "3", *TRAIN]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    state = tmp_path / ".t.work" / "checkpoint" / "state.json"
    wait_for_step(proc, state, 3)
    proc.send_signal(signal.SIGTERM)  # what docker stop, Slurm preemption and Kubernetes send
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("dpq: error: teacher: interrupted at step ") and last.endswith(
        "checkpoint saved, run the same command again to resume"), err[-3000:]
    assert sum(line.startswith("dpq: error:") for line in err.splitlines()) == 1
    saved = json.loads(state.read_text())["step"]
    assert saved >= 3 and not artifacts.is_complete(out)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and f"resuming from step {saved}" in r.stderr and artifacts.is_complete(out), \
        r.stderr[-3000:]


def test_ctrl_c_while_the_cli_starts_is_one_line(tmp_path, env):
    # SIGINT at the moment the CLI first imports torch (building the parser, before any command runs): a real
    # Ctrl-C lands there most often, since that import is most of the start-up time
    (tmp_path / "r.yaml").write_text("teacher: {epochs: 1}\n")
    starter = ("import builtins, os, runpy, signal, sys\n"
               "real = builtins.__import__\n"
               "def hook(name, *a, **k):\n"
               "    if name == 'torch' and 'torch' not in sys.modules:\n"
               "        builtins.__import__ = real\n"
               "        os.kill(os.getpid(), signal.SIGINT)\n"
               "    return real(name, *a, **k)\n"
               "builtins.__import__ = hook\n"
               "sys.argv = ['dpq', 'run', 'r.yaml', '--dry-run']\n"
               "runpy.run_module('dpq', run_name='__main__', alter_sys=True)\n")
    r = subprocess.run([sys.executable, "-c", starter], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert (r.returncode, r.stderr) == (130, "dpq: interrupted\n")


# ----------------------------------------------------------------------------- item 12: disks, files, caches


def test_a_disk_filling_mid_stage_is_one_line_and_keeps_the_earlier_artifact(finished_teacher, tiny_models,
                                                                             sst2_slice, tmp_path, env):
    before = digest(finished_teacher)
    limit = 64 << 10  # far below the tiny model's first checkpoint, above every small file a stage writes first

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = dpq("teacher", "--model", tiny_models["student"], "--data", sst2_slice, "--out", finished_teacher,
            "--epochs", "2", *TRAIN, "--force", env=env, preexec_fn=small_files)
    assert "Traceback" not in r.stderr and r.returncode == 2, (r.returncode, r.stderr[-3000:])  # not SIGXFSZ
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("dpq: error: file too large") and "earlier results are kept" in last, r.stderr[-3000:]
    assert sum(line.startswith("dpq: error:") for line in r.stderr.splitlines()) == 1
    assert digest(finished_teacher) == before
    artifacts.verify(finished_teacher)


def test_a_full_or_unwritable_cache_warns_and_computes_in_memory(finished_teacher, sst2_slice, tmp_path, env):
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("a file where the cache folder should be\n")
    out = tmp_path / "distilled"
    r = dpq("distill", "--teacher", finished_teacher, "--data", sst2_slice, "--out", out, "--epochs", "1",
            "--student", finished_teacher, *TRAIN, env=dict(env, DPQ_CACHE=str(not_a_folder)))
    assert r.returncode == 0 and artifacts.is_complete(out), r.stderr[-3000:]
    warned = [line for line in r.stderr.splitlines() if "teacher logits not cached" in line]
    assert len(warned) == 1 and "using them from memory" in warned[0], r.stderr[-3000:]
    assert not_a_folder.read_text() == "a file where the cache folder should be\n"


def test_a_cache_disk_that_fills_costs_a_warning_not_the_logits(tiny_models, sst2_slice, tmp_path, monkeypatch,
                                                                caplog):
    import errno

    from dpq import data, models, teachers

    model, tok = models.load_classifier(str(tiny_models["teacher"]))
    train = data.load_data(sst2_slice).split("train")
    encoded = data.encode_split(train, tok, 32)
    pads = data.pad_ids(tok)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(teachers, "save_file", full)
    with caplog.at_level(logging.WARNING, logger="dpq"):
        got = teachers.cached_teacher_logits(model.eval(), tiny_models["teacher"], encoded, train.fingerprint(), pads,
                                             32, key="input_ids")
    assert "teacher logits not cached" in caplog.text and "No space left on device" in caplog.text
    want = teachers._compute_logits(model, encoded, pads, "input_ids")
    assert got.shape == (len(train), 2) and (got == want).all()
    assert list((tmp_path / "cache" / "teacher-logits").iterdir()) == []  # no temporary file left behind


def test_a_cache_that_cannot_hold_the_packaged_teacher_is_one_line(tmp_path, monkeypatch):
    from dpq import models

    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("")
    monkeypatch.setenv("DPQ_CACHE", str(not_a_folder))
    try:
        found = models._mpnet_from_packages()
    except DpqError as e:  # its weights must lie in a folder to load: refused, not a traceback
        assert "cannot unpack the packaged all-mpnet-base-v2 there (Not a directory)" in str(e)
    else:
        assert found is None, "the packages are installed, so the unpack was tried"
        pytest.skip("the all-mpnet-base-v2 packages are not installed")


def test_evaluate_json_that_cannot_be_written_is_refused_before_evaluating(finished_teacher, sst2_slice, tmp_path,
                                                                            env, capsys):
    folder = tmp_path / "rows"
    folder.mkdir()
    start = time.monotonic()
    r = dpq("evaluate", finished_teacher, "--data", sst2_slice, "--json", folder, env=env)
    one_error_line(r, f"--json {folder}: is a folder")
    assert r.stdout == "" and list(folder.iterdir()) == [] and time.monotonic() - start < 60
    before = digest(finished_teacher)
    code = main(["evaluate", str(finished_teacher), "--data", str(sst2_slice), "--json",
                 str(finished_teacher / "config.json")])
    assert code == 2 and "inside the model folder" in capsys.readouterr().err
    assert digest(finished_teacher) == before
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')  # the user's own file under the name given: never overwritten
    code = main(["evaluate", str(finished_teacher), "--data", str(sst2_slice), "--json", str(notes)])
    assert code == 2 and "not an earlier `dpq evaluate --json` file" in capsys.readouterr().err
    assert notes.read_text() == '{"mine": true}'
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"name": "old", "runtime": "torch-fp32"}]))  # dpq's own earlier rows: replaced
    assert main(["evaluate", str(finished_teacher), "--data", str(sst2_slice), "--json", str(rows),
                 "--latency-repeats", "1", "--warmup", "0"]) == 0
    assert [r["name"] for r in json.loads(rows.read_text())] == [finished_teacher.name]


def _run_with_results(tmp_path, rows) -> Path:
    run = tmp_path / "run"
    (run / "evaluation").mkdir(parents=True, exist_ok=True)
    (run / "evaluation" / "results.json").write_text(rows if isinstance(rows, str) else json.dumps(rows))
    return run


def _row(name, **kw):
    return dict({"name": name, "runtime": "torch-fp32", "accuracy": 0.9, "params": 1_000_000, "size_mb": 4.0,
                 "gflops": 0.5, "latency_ms_bs1": 2.0, "latency_ms_bs32": 30.0}, **kw)


@pytest.mark.parametrize("rows, message", [
    ('[{"name": "teacher", "accuracy": 0.9', "not valid JSON"),
    ({"teacher": _row("teacher")}, "expected a list of evaluation rows"),
    ([_row("teacher"), "distilled"], "row 2 is not a mapping"),
    ([_row("teacher"), {k: v for k, v in _row("distilled").items() if k != "size_mb"}],
     "row 2 (distilled) has no size_mb"),
    ([_row("teacher"), _row("distilled", accuracy="high")], "row 2 (distilled): accuracy must be a number from 0 to 1"),
    ([_row("teacher"), _row("distilled", accuracy=88.5)], "accuracy must be a number from 0 to 1, got 88.5"),
    ([_row("teacher"), _row("distilled", size_mb=0)], "row 2 (distilled): size_mb must be a number > 0"),
    ([_row("teacher", gflops=float("nan"))], "row 1 (teacher): gflops must be a number >= 0, got NaN"),
    ([_row("teacher"), _row("distilled", latency_ms_bs32=0)], "row 2 (distilled): latency_ms_bs32 must be a number"),
    ([_row("teacher"), _row("teacher")], "row 2 (teacher): a second row of the same name"),
    ([_row("teacher", hardware="fast")], "row 1 (teacher): hardware must be a mapping"),
])
def test_report_refuses_a_hand_edited_results_file_naming_it(tmp_path, capsys, rows, message):
    run = _run_with_results(tmp_path, rows)
    code = main(["report", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{run / 'evaluation' / 'results.json'}: " in err, err
    assert message in err, err
    assert not (run / "report").exists()


def test_report_of_a_hand_edited_results_file_in_a_real_process(tmp_path, env):
    run = _run_with_results(tmp_path, [_row("teacher"), _row("distilled")])
    (run / "evaluation" / "results.json").write_bytes(b"\xff" + (run / "evaluation" / "results.json").read_bytes())
    one_error_line(dpq("report", run, env=env), f"{run / 'evaluation' / 'results.json'}: not valid JSON")


# ----------------------------------------------------------------------------- item 13: predict, model cards

HOSTILE = ["\x1b[31mred\x1b[0m", "\x1b]0;title\x07bell", "\u202eright-to-left", "\x9b2J c1", "one\u2028text",
           "tab\there"]


def _escape_labelled(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["id2label"] = {"0": "\x1b[2Jneg", "1": "pos"}
    config["label2id"] = {"\x1b[2Jneg": 0, "pos": 1}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _terminal_safe(text: str) -> bool:
    import unicodedata

    return all(ch in "\t\n" or unicodedata.category(ch)[0] != "C" and unicodedata.category(ch) not in ("Zl", "Zp")
               for ch in text)


def test_predict_reads_standard_input_and_prints_no_terminal_escapes(tiny_models, tmp_path, env):
    model = _escape_labelled(tiny_models["student"], tmp_path / "model")
    stdin = "\n".join(HOSTILE) + "\r\n\n"
    r = dpq("predict", model, "--file", "-", input=stdin, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert len(lines) == len(HOSTILE) and _terminal_safe(r.stdout)  # U+2028 inside a text does not end it
    assert [line.split("\t")[2] for line in lines] == [
        "\\x1b[31mred\\x1b[0m", "\\x1b]0;title\\x07bell", "\\u202eright-to-left", "\\x9b2J c1", "one\\u2028text",
        "tab\\there"]
    assert all(line.split("\t")[0] in ("\\x1b[2Jneg", "pos") for line in lines)

    r = dpq("predict", model, "--file", "-", "--json", input=stdin, env=env)
    assert r.returncode == 0 and _terminal_safe(r.stdout), r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["text"] for row in rows] == HOSTILE  # a JSON reader gets the texts back exactly
    assert {row["label"] for row in rows} <= {"\x1b[2Jneg", "pos"}


def test_a_single_stage_model_card_shows_the_accuracy_it_measured(finished_teacher):
    metrics = json.loads((finished_teacher / "metrics.json").read_text())
    card = (finished_teacher / "README.md").read_text()
    meta = cards.front_matter(card)
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0]["value"] == metrics["accuracy"] and result["dataset"]["split"] == "validation"
    assert "measured by the teacher stage" in result["metrics"][0]["name"]
    assert f"Accuracy {metrics['accuracy']:.4f} on the dev split, measured by the `teacher` stage" in card
    assert "Not measured yet" not in card
    artifacts.verify(finished_teacher)  # the card is outside the checksums: the folder still verifies
