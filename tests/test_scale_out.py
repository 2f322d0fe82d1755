"""Several processes on the CPU (gloo), started by torchrun as `accelerate launch --multi_gpu` starts them on GPUs
(on the CPU, `accelerate launch` runs several processes only through mpirun): each process trains on its share of
every batch, only the main one writes, and a killed job resumes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dpq.pipeline import load_stage_data
from dpq.recipe import DataSettings

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, DPQ_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")


@pytest.fixture
def no_dropout(tiny_models, tmp_path) -> Path:
    """Without dropout one process and two draw no different random numbers: only float summation order differs."""
    folder = tmp_path / "nodrop"
    shutil.copytree(tiny_models["student"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def teacher_args(model, data, out, *extra):
    return ["-m", "dpq", "teacher", "--model", str(model), "--data", str(data), "--out", str(out), "--max-length", "32",
            "--log-every", "1", *extra]


# the held-out slice off: the same 64 rows as before it existed, whichever data the slice fixture found (real SST-2
# or, in a clone without ../shared, synthetic rows, on which Adam's first steps amplify summation order more)
SHORT = ["--epochs", "1", "--max-train-samples", "64", "--batch-size", "16", "--lr", "1e-4",
         "--validation-fraction", "0"]


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, no_dropout, sst2_slice, env):
    one = subprocess.run([sys.executable, *teacher_args(no_dropout, sst2_slice, tmp_path / "one", *SHORT)],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([*TORCHRUN, *teacher_args(no_dropout, sst2_slice, tmp_path / "two", *SHORT)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stderr.count("teacher done") == 1  # one log: the main process's
    rows = {d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("one", "two")}
    assert [r["step"] for r in rows["one"]] == [r["step"] for r in rows["two"]]  # 4 steps each: the same batches
    # the mean over both shards is the one process's mean over the whole batch: equal at the first step, then apart
    # by float summation order only, which Adam's normalised early steps enlarge (measured: 4e-5 in loss, 3.8e-4 in
    # weights); a lost or doubled shard would be off by 1e-2
    losses = [(a["loss"], b["loss"]) for a, b in zip(rows["one"], rows["two"]) if "loss" in a]
    assert losses[0][1] == pytest.approx(losses[0][0], abs=1e-6)
    assert all(b == pytest.approx(a, abs=5e-4) for a, b in losses)
    a, b = (load_file(str(tmp_path / "one" / "model.safetensors")),
            load_file(str(tmp_path / "two" / "model.safetensors")))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"largest weight difference, one process vs two: {worst:.2e}")
    assert worst < 1e-3
    # nothing written twice, nothing left behind by the second process (nor the lock file: its holder removed it)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".two")) == []


def test_a_killed_two_process_job_resumes(tmp_path, tiny_models, sst2_slice, env):
    long = ["--epochs", "20", "--batch-size", "4", "--checkpoint-every", "2", "--lr", "1e-3"]
    cmd = [*TORCHRUN, *teacher_args(tiny_models["student"], sst2_slice, tmp_path / "t", *long)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = tmp_path / ".t.work" / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["step"] >= 6:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed"
    for pid in [proc.pid, *_workers_of(tmp_path / "t")]:  # torchrun starts each worker in a session of its own
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming from step" in r.stderr
    m = json.loads((tmp_path / "t" / "metrics.json").read_text())
    rows = len(load_stage_data(DataSettings(path=str(sst2_slice))).split("train"))  # less the held-out slice
    assert m["train_steps"] == 20 * -(-rows // 4)


def _workers_of(out: Path) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if d.name.isdigit() and b"dpq" in cmd and str(out).encode() in cmd and int(d.name) != os.getpid():
            found.append(int(d.name))
    return found
