"""Two processes on one folder, and damaged caches or checkpoints, in real processes: the user keeps their work and
gets one line, never a traceback."""

import json
import os
import random
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

# 1 000 steps of a tiny model: seconds, long enough for a second process to start while the first trains
TRAIN = ["--epochs", "10", "--batch-size", "2", "--max-length", "32", "--checkpoint-every", "2", "--lr", "1e-3"]


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, DPQ_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")


def teacher_cmd(model, data, out, *extra):
    return [sys.executable, "-m", "dpq", "teacher", "--model", str(model), "--data", str(data), "--out", str(out),
            *TRAIN, *extra]


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture
def lone_run(tmp_path, tiny_models, sst2_slice, env) -> Path:
    ref = tmp_path / "ref"
    r = subprocess.run(teacher_cmd(tiny_models["student"], sst2_slice, ref), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return ref


def test_a_second_writer_is_refused_and_the_first_run_is_intact(tmp_path, tiny_models, sst2_slice, env, lone_run):
    out = tmp_path / "out"
    first = subprocess.Popen(teacher_cmd(tiny_models["student"], sst2_slice, out), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env)
    wait_for_step(first, tmp_path / ".out.work" / "checkpoint" / "state.json", 4)
    second = subprocess.run(teacher_cmd(tiny_models["student"], sst2_slice, out, "--force"), capture_output=True,
                            text=True, env=env, timeout=120)
    assert first.poll() is None, "the first run ended before the second was refused: the test proves nothing"
    assert second.returncode == 2, second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith("dpq: error:") and f"process {first.pid}" in last and "Traceback" not in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    same_weights(lone_run, out)
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(out) == rows(lone_run)  # no row of the second process, none twice


def test_a_lock_does_not_outlive_its_holder(tmp_path, tiny_models, sst2_slice, env):
    out = tmp_path / "out"
    proc = subprocess.Popen(teacher_cmd(tiny_models["student"], sst2_slice, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    wait_for_step(proc, tmp_path / ".out.work" / "checkpoint" / "state.json", 4)
    proc.kill()
    proc.wait(timeout=60)
    assert (tmp_path / ".out.lock").is_file()  # the file stays; the kernel dropped the lock with the process
    r = subprocess.run(teacher_cmd(tiny_models["student"], sst2_slice, out), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "resuming from step" in r.stderr and artifacts.is_complete(out)
    assert not (tmp_path / ".out.lock").exists()  # taken over, and removed by the holder that finished


@pytest.mark.parametrize("damage", ["newest", "both"])
def test_a_damaged_checkpoint_falls_back_and_ends_like_an_uninterrupted_run(tmp_path, tiny_models, sst2_slice, env,
                                                                            lone_run, damage):
    seed = int(os.environ.get("DPQ_TEST_SEED", time.time_ns() % 1_000_000))
    stop = random.Random(seed).randint(6, 300)
    print(f"killed at step >= {stop} (DPQ_TEST_SEED={seed} repeats it)")
    out = tmp_path / "out"
    work = tmp_path / ".out.work"
    proc = subprocess.Popen(teacher_cmd(tiny_models["student"], sst2_slice, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    wait_for_step(proc, work / "checkpoint" / "state.json", stop)
    proc.kill()
    proc.wait(timeout=60)
    targets = [work / "checkpoint"] + ([work / "checkpoint.prev"] if damage == "both" else [])
    for folder in targets:
        w = folder / "weights.safetensors"
        assert w.is_file(), f"{folder} missing after the kill"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # a disk that filled up mid-write
    r = subprocess.run(teacher_cmd(tiny_models["student"], sst2_slice, out), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    if damage == "newest":
        assert "trying the previous one" in r.stderr and "resuming from step" in r.stderr
    else:
        assert "starting the stage over" in r.stderr and "resuming from step" not in r.stderr
    same_weights(lone_run, out)


def test_a_damaged_teacher_logits_cache_entry_is_recomputed(capsys, tmp_path, tiny_models, sst2_slice, env):
    teacher = tmp_path / "teacher"
    fast = ["--epochs", "1", "--max-train-samples", "48", "--batch-size", "16", "--max-length", "32"]
    assert main(["teacher", "--model", str(tiny_models["teacher"]), "--data", str(sst2_slice), "--out", str(teacher),
                 *fast]) == 0

    def distill(out):
        return subprocess.run([sys.executable, "-m", "dpq", "distill", "--teacher", str(teacher), "--student",
                               str(tiny_models["student"]), "--data", str(sst2_slice), "--out", str(out), *fast],
                              capture_output=True, text=True, env=env)

    r = distill(tmp_path / "a")
    assert r.returncode == 0, r.stderr
    (entry,) = (tmp_path / "cache" / "teacher-logits").glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])  # a copy cut short
    r = distill(tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert "damaged or stale" in r.stderr and "Traceback" not in r.stderr
    same_weights(tmp_path / "a", tmp_path / "b")
    assert load_file(str(entry))["logits"].shape[0] == 48  # the entry was written again, whole
    r = distill(tmp_path / "c")
    assert r.returncode == 0 and "teacher logits from cache" in r.stderr and "recomputing" not in r.stderr
