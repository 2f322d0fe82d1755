"""Issue 24, items 6, 7 and the data rows of 12-13: stray rows never become classes, rows end only at a newline, and
stage keys hold the content of data files and plain model folders, so an edit in place re-runs what read it."""

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
from conftest import _vocab, make_tiny

from dpq import data as data_module
from dpq.data import file_digest, load_data
from dpq.errors import DpqError


def write(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text, encoding="utf-8", newline="")
    return folder / name


def dpq(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dpq", *map(str, args)], capture_output=True, text=True, env=env)


def one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and lines[-1].startswith("dpq: error:"), r.stderr
    assert all(n in lines[-1] for n in needles), lines[-1]


ROWS = "".join(f"row {i}\t{i % 2}\n" for i in range(20))


def test_only_newlines_end_rows_and_a_quoted_csv_newline_is_kept(tmp_path):
    odd = "a\u2028b", "c\x85d", "e\x0cf", "g\x0bh", "i\x1cj", "k\rl"  # line separators str.splitlines cuts at
    write(tmp_path, "train.tsv", "sentence\tlabel\r\n" + "".join(f"{t}\t{i % 2}\r\n" for i, t in enumerate(odd)))
    write(tmp_path, "dev.csv", 'text,label\n"two\nlines",1\n"crlf\r\nkept",0\nplain,1\n')
    data = load_data(tmp_path)
    assert data.split("train").texts == list(odd) and data.split("train").labels == [0, 1, 0, 1, 0, 1]
    assert data.split("dev").texts == ["two\nlines", "crlf\r\nkept", "plain"]
    jsonl = write(tmp_path / "j", "train.jsonl", "".join(json.dumps({"text": t, "label": i % 2}, ensure_ascii=False)
                                                       + "\n" for i, t in enumerate(odd)))
    assert load_data(f"{jsonl},{tmp_path / 'dev.csv'}").split("train").texts == list(odd)


def test_jsonl_text_must_be_a_string_and_labels_strings_or_integers(tmp_path):
    rows = [{"text": "fine", "label": 1}, {"text": None, "label": 0}, {"text": "b", "label": True},
            {"text": "c", "label": [1]}, {"text": "d", "label": 1.0}, {"text": 7, "label": 0},
            {"text": "e", "label": 0}]
    train = write(tmp_path, "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    dev = write(tmp_path, "dev.tsv", "sentence\tlabel\nx\t0\ny\t1\n")
    with pytest.raises(DpqError) as e:
        load_data(f"{train},{dev}")
    said = str(e.value)
    assert "\n" not in said and "train.jsonl: 5 malformed row(s)" in said
    for line, why in [(2, "text is null"), (3, "label true is a boolean"), (4, "label [1] is a list"),
                      (5, "label 1.0 is a floating-point number"), (6, "text is int")]:
        assert f"line {line} ({why}" in said
    data = load_data(f"{train},{dev}", skip_bad_rows=True)
    assert data.label_names == ["0", "1"] and data.split("train").texts == ["fine", "e"] and data.skipped_rows == 5


@pytest.mark.parametrize("stray, why", [
    ("sentence\tlabel", "line 22 (the header line again"),  # two files joined: the second one's header
    ("text\tlabel", "line 22 (the header line again"),
    ("x\t1.0", "line 22 (label '1.0' is the integer label '1' written another way"),
    ("x\t01", "line 22 (label '01' is the integer label '1' written another way"),
    ("x\ttrue", "line 22 (label 'true' among integer labels (0, 1)"),
    ("x\t[1]", "line 22 (label '[1]' among integer labels (0, 1)"),
])
def test_stray_rows_are_refused_by_file_and_line_not_made_classes(tmp_path, stray, why):
    write(tmp_path, "train.tsv", "sentence\tlabel\n" + ROWS + stray + "\n")
    write(tmp_path, "dev.tsv", "sentence\tlabel\na\t0\nb\t1\n")
    with pytest.raises(DpqError) as e:
        load_data(tmp_path)
    assert f"train.tsv: 1 malformed row(s): {why}" in str(e.value) and "\n" not in str(e.value)
    data = load_data(tmp_path, skip_bad_rows=True)
    assert data.label_names == ["0", "1"] and len(data.split("train")) == 20


def test_names_beside_integers_stay_classes_where_they_are_classes_and_declared_classes_decide(tmp_path):
    write(tmp_path, "train.tsv", "sentence\tlabel\n" + "".join(f"s{i}\t{['0', '1', 'other'][i % 3]}\n"
                                                               for i in range(30)))
    write(tmp_path, "dev.tsv", "sentence\tlabel\na\t0\nb\t1\nc\tother\n")
    assert load_data(tmp_path).label_names == ["0", "1", "other"]  # a class of its own size, not a stray
    write(tmp_path, "train.tsv", "sentence\tlabel\n" + ROWS + "x\ttrue\n")
    write(tmp_path, "dev.tsv", "sentence\tlabel\na\t0\nb\ttrue\n")
    assert load_data(tmp_path, labels=["0", "1", "true"]).split("dev").labels == [0, 2]  # declared: no guessing
    with pytest.raises(DpqError, match=r"train.tsv: label 'true' \(line 22\) is not one of the classes \['0', '1'"):
        load_data(tmp_path, labels=["0", "1"])


def test_a_class_with_almost_no_rows_is_said_in_one_line(tmp_path, caplog):
    # an integer stray (a 2 among 0/1 labels) is a class by its spelling: the head gets 3 outputs, and that is said
    write(tmp_path, "train.tsv", "sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(300)) + "odd\t2\n")
    write(tmp_path, "dev.tsv", "sentence\tlabel\na\t0\nb\t1\n")
    caplog.set_level(logging.WARNING, logger="dpq")
    data = load_data(tmp_path)
    assert data.num_labels == 3
    warned = [r.getMessage() for r in caplog.records if "classes" in r.getMessage()]
    assert len(warned) == 1 and "'2' (1 train, 0 dev rows)" in warned[0] and "3 classes" in warned[0]
    caplog.clear()
    write(tmp_path, "train.tsv", "sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(300)))
    load_data(tmp_path)
    assert not [r for r in caplog.records if "classes" in r.getMessage()]


def test_data_mistakes_end_in_one_line_in_a_real_process(tmp_path, tiny_models):
    concatenated = write(tmp_path / "joined", "train.tsv", "sentence\tlabel\n" + ROWS + "sentence\tlabel\n" + ROWS)
    write(tmp_path / "joined", "dev.tsv", "sentence\tlabel\na\t0\nb\t1\n")
    r = dpq("teacher", "--model", tiny_models["teacher"], "--data", concatenated.parent, "--out", tmp_path / "t")
    one_line_error(r, f"{concatenated}: 1 malformed row(s): line 22 (the header line again")
    # an unclosed quote runs on past csv.field_size_limit: one line naming where, not a traceback
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "train.csv", "w", encoding="utf-8") as f:
        f.write("text,label\nfine,0\nalso fine,1\n\"open quote," + "x" * (17 << 20) + "\n")
    write(big, "dev.csv", "text,label\na,0\nb,1\n")
    r = dpq("teacher", "--model", tiny_models["teacher"], "--data", big, "--out", tmp_path / "t")
    one_line_error(r, f"{big / 'train.csv'}:4: a field longer than 16 MiB")
    assert not (tmp_path / "t").exists()


def test_file_digests_are_cached_by_stat_and_an_unwritable_cache_costs_only_a_re_read(tmp_path, monkeypatch,
                                                                                      caplog):
    from dpq import artifacts

    reads = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p, *a: reads.append(p) or real(p, *a))
    monkeypatch.setattr(data_module, "_RACY_NS", 0)  # files written a moment ago count as settled
    f = write(tmp_path, "train.tsv", "sentence\tlabel\na\t0\n")
    os.utime(f, ns=(10**18, 10**18))
    first = file_digest(f)
    monkeypatch.setattr(data_module, "_DIGESTS", {})  # a new process: only $DPQ_CACHE remembers
    assert file_digest(f) == first == real(f) and len(reads) == 1
    f.write_text("sentence\tlabel\na\t1\n")  # same size, edited in place
    assert file_digest(f) != first and len(reads) == 2

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("DPQ_CACHE", str(blocked))
    monkeypatch.setattr(data_module, "_DIGESTS", {})
    monkeypatch.setattr(data_module, "_unwritable_cache_said", False)
    caplog.set_level(logging.WARNING, logger="dpq")
    g = write(tmp_path, "dev.tsv", "sentence\tlabel\nb\t0\n")
    assert file_digest(f) == real(f) and file_digest(g) == real(g)
    assert len([r for r in caplog.records if "file-digest cache" in r.getMessage()]) == 1


def test_keys_hold_local_files_content_and_hub_ids_as_before(tmp_path, tiny_models, sst2_slice):
    from dpq.recipe import BaselineSettings, DataSettings, DistillSettings, TeacherSettings
    from dpq.registry import describe_change, stage_key
    from dpq.teachers import teacher_key

    local = dataclasses.asdict(DataSettings(path=str(sst2_slice)))
    key = stage_key(DistillSettings(student=str(tiny_models["student"])), data=local)
    assert key["contents"] == {"data": {s: file_digest(sst2_slice / f"{s}.tsv")[:16] for s in ("train", "dev")},
                               "student": teacher_key(tiny_models["student"], "", 0)}
    key = stage_key(BaselineSettings(), data=local, inputs={"model": tiny_models["student"]})  # a plain input folder
    assert key["model"] == str(tiny_models["student"]) and key["contents"]["model"] == teacher_key(
        tiny_models["student"], "", 0)
    assert describe_change(dict(key, contents={}), key) == "data changed; model changed"
    assert describe_change({k: v for k, v in key.items() if k != "contents"}, key).startswith("keyed by the content")

    copy = shutil.copytree(tiny_models["student"], tmp_path / "student-copy")
    before = teacher_key(copy, "", 0)
    with open(copy / "vocab.txt", "a") as f:  # a tokenizer whose only file is vocab.txt, edited in place
        f.write("newword\n")
    assert teacher_key(copy, "", 0) != before

    hub = dataclasses.asdict(DataSettings(path="nyu-mll/glue:sst2"))
    for settings in (TeacherSettings(), DistillSettings()):  # hub models: all-mpnet-base-v2, all-MiniLM-L6-v2
        key = stage_key(settings, data=hub)
        assert "contents" not in key and key["data"] == hub  # no entry: artifacts sealed before are not re-run
        assert set(key) <= set(dataclasses.asdict(settings)) | {"data"}


RECIPE = """
data: {data}
teacher: {{model: {teacher}, epochs: 1, max_train_samples: 16, batch_size: 16}}
baseline: {{enabled: false}}
distill: {{student: {student}, epochs: 1, max_train_samples: 16, batch_size: 16}}
prune: {{enabled: false}}
quantize: {{enabled: false}}
export: {{enabled: false}}
evaluate: {{latency_repeats: 1, latency_rounds: 1, warmup: 0, batch_sizes: [2]}}
"""


def dry_run(recipe, run):
    r = dpq("run", recipe, "--out", run, "--dry-run")
    assert r.returncode == 0, r.stderr
    return {name: why for name, why in (line.split(None, 1) for line in r.stdout.strip().splitlines())}


def test_run_reruns_what_read_data_or_a_model_edited_in_place(tmp_path, tiny_models, sst2_slice):
    data = tmp_path / "data"
    shutil.copytree(sst2_slice, data)
    teacher, student = (shutil.copytree(tiny_models[k], tmp_path / k) for k in ("teacher", "student"))
    recipe, run = tmp_path / "r.yaml", tmp_path / "run"
    recipe.write_text(RECIPE.format(data=data, teacher=teacher, student=student))
    r = dpq("run", recipe, "--out", run)
    assert r.returncode == 0, r.stderr
    assert set(dry_run(recipe, run).values()) == {"skip  complete, settings unchanged"}

    dev = (data / "dev.tsv").read_bytes()
    lines = dev.decode().splitlines(keepends=True)
    flipped = lines[0] + "".join(t[:-2] + ("0" if t[-2] == "1" else "1") + "\n" for t in lines[1:])
    (data / "dev.tsv").write_text(flipped)  # every dev label flipped in place: same path, same size
    assert len(flipped.encode()) == len(dev)
    todo = dry_run(recipe, run)
    assert todo["teacher"] == todo["distill"][:len(todo["teacher"])] == "run   data changed"
    assert todo["evaluate"].startswith("run   data changed")
    (data / "dev.tsv").write_bytes(dev)  # the same bytes again, with a newer mtime: keyed as before (below)

    for folder, shape, seed in ((student, (32, 2, 64), 7), (teacher, (48, 4, 96), 8)):  # each one's weights replaced
        hidden, layers, ffn = shape
        other = make_tiny(tmp_path / f"other-{seed}", _vocab(sst2_slice), hidden=hidden, layers=layers, ffn=ffn,
                          seed=seed)
        shutil.copy(other / "model.safetensors", folder / "model.safetensors")
    todo = dry_run(recipe, run)
    assert todo["teacher"] == "run   model changed" and todo["distill"].startswith("run   model changed (student)")
    assert "data changed" not in todo["evaluate"]


def test_the_safety_checks_benchmark_times_a_first_and_a_remembered_hash(tmp_path, tiny_models, sst2_slice,
                                                                          monkeypatch, capsys):
    from conftest import load_benchmark

    bench = load_benchmark("safety_checks")
    monkeypatch.setattr(sys, "argv", ["safety_checks.py", "--data", str(sst2_slice), "--model",
                                      str(tiny_models["teacher"]), "--student", str(tiny_models["student"]),
                                      "--repeats", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert "in 2 files" in out and "the tokenizers read the same pieces" in out
    for line in ("data files: first hash", "model folder: first hash", "hidden-state KD check"):
        assert line in out, out
