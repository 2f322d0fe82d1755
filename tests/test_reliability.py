"""Interrupted runs, untrusted files and bad input at scale, in real processes where it matters."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import wait_for_step
from safetensors.torch import load_file

from dpq import artifacts
from dpq.cli import main
from dpq.data import load_data
from dpq.errors import DpqError

# 1 000 steps of a tiny model: seconds, yet long enough that the interruption lands well before the end
TRAIN = ["--epochs", "10", "--batch-size", "2", "--max-length", "32", "--checkpoint-every", "2", "--lr", "1e-3"]


def cli(capsys, *args):
    code = main([str(a) for a in args])
    return code, *capsys.readouterr()


def _teacher_cmd(model, data, out):
    return [sys.executable, "-m", "dpq", "teacher", "--model", str(model), "--data", str(data), "--out", str(out),
            *TRAIN]


def _start_and_interrupt(cmd, work: Path, sig: int, env: dict, min_step: int) -> subprocess.Popen:
    # a shell that starts jobs in the background (as CI runners may) hands them SIGINT ignored, and Python then
    # never raises KeyboardInterrupt: give the child the default disposition, as a terminal would
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_step(proc, work / "checkpoint" / "state.json", min_step)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, DPQ_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")


def test_sigkill_at_a_random_step_resumes_to_the_same_model(tmp_path, tiny_models, sst2_slice, env):
    ref = tmp_path / "ref"
    r = subprocess.run(_teacher_cmd(tiny_models["student"], sst2_slice, ref), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr

    seed = int(os.environ.get("DPQ_TEST_SEED", time.time_ns() % 1_000_000))
    kill_at = random.Random(seed).randint(2, 200)
    print(f"killed at step >= {kill_at} (DPQ_TEST_SEED={seed} repeats it)")  # shown by pytest when the test fails
    out = tmp_path / "killed"
    proc = _start_and_interrupt(_teacher_cmd(tiny_models["student"], sst2_slice, out), tmp_path / ".killed.work",
                                signal.SIGKILL, env, min_step=kill_at)
    assert proc.returncode == -signal.SIGKILL
    assert not artifacts.is_complete(out)  # nothing that looks finished
    assert not any(p.name.startswith(".killed.tmp") and (p / "manifest.json").exists() for p in tmp_path.iterdir())

    r = subprocess.run(_teacher_cmd(tiny_models["student"], sst2_slice, out), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "resuming from step" in r.stderr
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (ref, out))
    assert ma["accuracy"] == mb["accuracy"] and ma["loss"] == pytest.approx(mb["loss"], rel=1e-4)


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_models, sst2_slice, env):
    out = tmp_path / "t"
    proc = _start_and_interrupt(_teacher_cmd(tiny_models["student"], sst2_slice, out), tmp_path / ".t.work",
                                signal.SIGINT, env, min_step=3)
    err = proc.stderr.read()
    assert proc.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert "checkpoint saved, run the same command again to resume" in err.strip().splitlines()[-1]
    assert not artifacts.is_complete(out)
    r = subprocess.run(_teacher_cmd(tiny_models["student"], sst2_slice, out), capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "resuming from step" in r.stderr and artifacts.is_complete(out)


def test_million_row_file_with_bad_lines(tmp_path):
    bad_at = {1234, 500_000, 999_990}  # data line numbers (1-based, after the header)
    with open(tmp_path / "train.tsv", "w") as f:
        f.write("sentence\tlabel\n")
        for i in range(1, 1_000_001):
            f.write("no tab on this line\n" if i in bad_at else f"row {i} text\t{i % 2}\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(DpqError) as e:
        load_data(tmp_path)
    msg = str(e.value)
    assert "3 malformed row(s)" in msg and all(f"line {n + 1} " in msg for n in bad_at)  # file lines count the header
    data = load_data(tmp_path, skip_bad_rows=True)
    assert len(data.split("train")) == 1_000_000 - 3 and data.skipped_rows == 3


def test_empty_and_non_text_rows(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"sentence": "", "label": 1}\n{"sentence": 5, "label": 0}\n'
                                          '{"sentence": "fine", "label": 0}\n')
    (tmp_path / "dev.jsonl").write_text('{"sentence": "ok", "label": 1}\n')
    with pytest.raises(DpqError, match=r"line 2 \(text is int, not a string\)"):
        load_data(tmp_path)
    data = load_data(tmp_path, skip_bad_rows=True)
    assert data.split("train").texts == ["", "fine"]  # an empty sentence is a sentence


def test_long_inputs_are_truncated_with_a_count(tiny_models, caplog):
    from dpq import models
    from dpq.data import Split, encode_split

    _, tok = models.load_classifier(str(tiny_models["student"]))
    split = Split(["word " * 5000, "short"], [0, 1], "x")
    with caplog.at_level("WARNING", logger="dpq"):
        ds = encode_split(split, tok, 64)
    assert (max(len(x) for x in ds.input_ids) == 64
            and "1 of 2 texts longer than 64 tokens were truncated" in caplog.text)


def test_full_disk_is_refused_before_training(capsys, tmp_path, tiny_models, sst2_slice, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    code, _, err = cli(capsys, "teacher", "--model", tiny_models["student"], "--data", sst2_slice, "--out",
                       tmp_path / "t", "--epochs", "1")
    assert code == 2 and "MB free" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "t").exists() and not (tmp_path / ".t.work").exists()


def test_read_only_output_is_refused_before_training(capsys, tmp_path, tiny_models, sst2_slice, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro and mode == os.W_OK else real(p, mode))
    code, _, err = cli(capsys, "teacher", "--model", tiny_models["student"], "--data", sst2_slice, "--out", ro / "t")
    assert code == 2 and "not writable" in err and not (ro / "t").exists()


def test_config_that_does_not_match_its_weights(capsys, tmp_path, tiny_models, sst2_slice):
    folder = tmp_path / "m"
    shutil.copytree(tiny_models["student"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli(capsys, "evaluate", folder, "--data", sst2_slice)
    assert code == 2 and "weights do not load" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_onnx_file_from_another_model_is_refused(capsys, tmp_path, tiny_models, sst2_slice):
    for name in ("student", "teacher"):
        assert cli(capsys, "export", "--model", tiny_models[name], "--out", tmp_path / name,
                   "--precision", "fp32")[0] == 0
    shutil.copy(tmp_path / "teacher" / "model.onnx", tmp_path / "student" / "model.onnx")
    code, _, err = cli(capsys, "evaluate", tmp_path / "student", "--data", sst2_slice)
    assert code == 2 and "model.onnx" in err and "checksum" in err
