"""dpq replaces only what it wrote, in real processes: an output folder that holds anyone else's files, a run folder it
did not make, the command's own input, are refused in one line (exit 2) before any work, with every file intact; its
locks follow no link, leave no file behind and a run's lock covers its stage folders; a killed writer's leftovers are
cleaned by the next one."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpq import artifacts
from dpq.cli import main

FAST = ["--epochs", "1", "--max-train-samples", "16", "--batch-size", "16", "--max-length", "32"]
RECIPE = """
name: tiny
data: {data}
teacher: {{model: {teacher}, epochs: 1, max_train_samples: 16, batch_size: 16, max_length: 32}}
baseline: {{enabled: false}}
distill: {{student: {student}, epochs: 1, max_train_samples: 16, batch_size: 16, max_length: 32}}
prune: {{enabled: false}}
quantize: {{enabled: false}}
export: {{enabled: false}}
evaluate: {{latency_repeats: 1, warmup: 0, batch_sizes: [1]}}
"""
# holds a folder's lock as `dpq run` holds its run folder (or a stage its folder) until killed
HOLD = ("import sys, time\nfrom dpq import locks\nwith locks.hold(sys.argv[1], covers_inside=True):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n")


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, DPQ_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")


def dpq(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpq", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def export(env, model, out, *extra) -> subprocess.CompletedProcess:
    return dpq(env, "export", "--model", model, "--precision", "fp32", "--out", out, *extra)


def refused(r: subprocess.CompletedProcess, *says: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("dpq: error:"), r.stderr
    assert all(s in lines[0] for s in says), lines[0]


def tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too): a file's SHA-256, a link's target."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = "folder"
    return out


def litter(folder: Path) -> list[str]:
    """What a writer leaves beside its folders when it is careless: lock files, temporary and set-aside folders."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob(".*") if "cache" not in p.parts
                  and (p.name.endswith(".lock") or ".tmp-" in p.name or ".old-" in p.name))


def sealed(folder: Path, kind: str, model: Path) -> Path:
    """A folder as a dpq stage of ``kind`` seals it (here: the tiny model's files)."""
    with artifacts.artifact_dir(folder, kind=kind, settings={"made_from": str(model)}) as tmp:
        for f in model.iterdir():
            shutil.copy2(f, tmp / f.name)
    return folder


def test_a_folder_dpq_did_not_write_or_reads_is_never_replaced(tmp_path, tiny_models, sst2_slice, env):
    model = tiny_models["student"]
    projects = tmp_path / "projects"  # `--out ~/projects`
    (projects / "code").mkdir(parents=True)
    (projects / "notes.txt").write_text("a week of work")
    (projects / "code" / "data.bin").write_bytes(os.urandom(4096))
    teacher = sealed(tmp_path / "teacher", "teacher", model)
    run = tmp_path / "run"  # a finished run of the previous dpq: its recipe beside sealed stages, no marker
    sealed(run / "teacher", "teacher", model)
    (run / "recipe.yaml").write_text("name: run\n")
    exported = sealed(tmp_path / "exported", "export", model)
    (exported / "my-benchmark.txt").write_text("the user's numbers")  # put into a dpq folder by its user
    keep = [projects, teacher, run, exported, model]
    before = {d: tree(d) for d in keep}

    refused(export(env, model, projects), "projects: a folder of files dpq did not write")
    refused(export(env, model, run), "a dpq run folder", "only an earlier export folder")
    refused(export(env, model, teacher), "a dpq teacher folder, not an earlier export one")
    refused(export(env, model, exported), "my-benchmark.txt: not written by dpq")
    refused(export(env, model, model / "onnx"), "inside this command's input (--model")
    # --out equal to the model it starts from, a folder dpq could otherwise replace: refused before any training
    refused(dpq(env, "teacher", "--model", teacher, "--data", sst2_slice, "--out", teacher, *FAST),
            "is this command's input (--model")
    assert {d: tree(d) for d in keep} == before  # byte for byte
    assert not (model / "onnx").exists() and litter(tmp_path) == []


def test_re_export_replaces_its_own_folder_and_leaves_nothing_behind(tmp_path, tiny_models, env):
    model, out = tiny_models["student"], tmp_path / "export"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)  # a pid no process has any more
    stale = tmp_path / f".export.tmp-{dead}-k1ll3d"  # what an export killed mid-way left
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half a file")
    live = tmp_path / f".export.tmp-{os.getpid()}-wr1t1ng"  # a live process's: left alone
    live.mkdir()
    (tmp_path / f".export.old-{dead}").symlink_to(tmp_path / "elsewhere")  # a symlinked --out's leftover
    r = export(env, model, out)
    assert r.returncode == 0, r.stderr
    assert litter(tmp_path) == [live.name]
    live.rmdir()
    first = (out / "manifest.json").stat().st_ino
    link = tmp_path / "latest"
    link.symlink_to(out.name)  # `--out latest`, a link to the earlier export
    r = export(env, model, link, "--force")
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and os.readlink(link) == out.name  # the link stays, pointing at the new folder
    assert (out / "manifest.json").stat().st_ino != first and artifacts.verify(out)["kind"] == "export"
    assert litter(tmp_path) == []  # no lock file, no .tmp-*, no .latest.old-PID link


def test_a_kill_between_the_two_renames_leaves_the_previous_artifact(tmp_path):
    out = tmp_path / "a"
    with artifacts.artifact_dir(out, kind="k") as tmp:
        (tmp / "w.bin").write_bytes(b"previous")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    os.replace(out, tmp_path / f".a.old-{dead}")  # set aside, then killed before the new one was renamed in
    with artifacts.artifact_dir(out, kind="k") as tmp:
        assert (out / "w.bin").read_bytes() == b"previous"  # put back at the next start, before anything else
        (tmp / "w.bin").write_bytes(b"new")
    assert (out / "w.bin").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_run_writes_only_into_a_run_folder_of_its_own_and_leaves_the_users_files(tmp_path, tiny_models, sst2_slice,
                                                                                  env):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(data=sst2_slice, teacher=tiny_models["teacher"], student=tiny_models["student"]))
    mine = tmp_path / "mine"  # the user's own folder, with a recipe.yaml and a report/ of their own
    (mine / "report").mkdir(parents=True)
    (mine / "recipe.yaml").write_text("my own notes\n")
    (mine / "report" / "draft.md").write_text("my draft")
    before = tree(mine)
    refused(dpq(env, "run", recipe, "--out", mine), "is not a dpq run folder")
    assert tree(mine) == before
    # data that cannot be read is refused before the run folder, its recipe or any lock exists
    r = dpq(env, "run", recipe, "--out", tmp_path / "new" / "run", "--data", tmp_path / "no-data")
    assert r.returncode == 2 and not (tmp_path / "new").exists(), r.stderr

    run = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(run)]) == 0
    assert artifacts.run_marker(run) is not None
    (run / "notes.txt").write_text("the user's")
    (run / "report" / "annotated.md").write_text("the user's too")  # inside a folder dpq rewrites on every run
    refused(dpq(env, "run", recipe, "--out", run), "report/annotated.md: not written by dpq")
    assert (run / "report" / "annotated.md").read_text() == "the user's too"
    (run / "report" / "annotated.md").unlink()
    r = dpq(env, "run", recipe, "--out", run)
    assert r.returncode == 0 and r.stderr.count("skipped") == 3, r.stderr
    assert (run / "notes.txt").read_text() == "the user's" and artifacts.is_complete(run / "report")
    finished = tree(run)
    refused(export(env, tiny_models["student"], run), "a dpq run folder")  # a stage command onto the whole run
    assert tree(run) == finished and litter(tmp_path) == []


def test_locks_follow_no_link_and_a_runs_lock_covers_its_stage_folders(tmp_path, tiny_models, sst2_slice, env):
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file")
    (tmp_path / ".planted.lock").symlink_to(victim)  # a link planted where dpq keeps the lock of `planted`
    refused(export(env, tiny_models["student"], tmp_path / "planted"), "symbolic link")
    assert victim.read_text() == "someone else's file" and not (tmp_path / "planted").exists()

    run = tmp_path / "run"
    run.mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(data=sst2_slice, teacher=tiny_models["teacher"], student=tiny_models["student"]))
    for held, command, says in [
        (run, ["teacher", "--model", tiny_models["teacher"], "--data", sst2_slice, "--out", run / "teacher", *FAST],
         "inside"),  # a stage into the run while `dpq run` holds it
        (run / "teacher", ["run", recipe, "--out", run], "holds"),  # a run over a stage being written
    ]:
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(held)], stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert holder.stdout.readline().strip() == "held"
            refused(dpq(env, *command), says, f"written by process {holder.pid}")
        finally:
            holder.kill()
            holder.wait(timeout=60)
        assert list(run.iterdir()) == [] or [p.name for p in run.iterdir()] == [".teacher.lock"]
    assert not (run / "teacher").exists()
