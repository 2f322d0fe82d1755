"""A model folder is data, never code: dpq imports nothing a folder names. Every folder dpq writes loads in dpq,
whatever its base architecture. A folder that cannot be the model it claims to be (a listed file gone, no tokenizer,
weights of another architecture or class count, a damaged config, export record or pickle) and settings the model
cannot take (max_length past its positions, no pad token, hidden-state KD across tokenizers) are refused in one line,
exit 2, before any work."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import SPECIALS, _vocab, make_tiny
from safetensors.torch import load_file, save_file

import dpq
from dpq import artifacts, models, transforms
from dpq.cli import main
from dpq.distill import KDConfig, check_same_tokens
from dpq.errors import DpqError

FAST = ["--epochs", "1", "--max-train-samples", "16", "--batch-size", "16", "--max-length", "32"]
TEXTS = ["a charming and often affecting journey", "bleak"]


def dpq_cmd(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpq", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit 2, no traceback, and the error is the one line of stderr that is not a progress log."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("dpq: ") or "error" in line]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("dpq: error:"), err
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def refused(r: subprocess.CompletedProcess, *needles: str) -> str:
    return one_line_error(r.returncode, r.stderr, *needles)


def cli(capsys, *args):
    code = main([str(a) for a in args])
    return code, *capsys.readouterr()


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("manifest.json"))
    return dst


def edit_json(path: Path, change) -> None:
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def sealed(model_dir: Path, out: Path, kind: str) -> Path:
    model, tok = models.load_classifier(str(model_dir))
    with artifacts.artifact_dir(out, kind=kind) as tmp:
        models.save_classifier(model, tok, tmp)
    return out


# ----------------------------------------------------------------------------- item 2: no code a folder names


def test_a_folder_cannot_make_dpq_import_its_own_code(tiny_models, tmp_path, monkeypatch):
    """A record naming a module beside the folder is refused by name with the folder as the current directory and
    as a package under it, and in a notebook with it on sys.path: the payload never runs."""
    folder = copy_model(tiny_models["student"], tmp_path / "downloaded")
    marker = tmp_path / "payload-ran"
    (folder / "payload.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    for cwd, module in ((folder, "payload"), (tmp_path, "downloaded.payload")):
        edit_json(folder / "config.json",
                  lambda c, m=module: c.update(dpq_transforms=[{"name": "payload", "version": 1, "module": m}]))
        refused(dpq_cmd("predict", folder, "a good film", cwd=cwd), "transform 'payload'", "nothing was imported")
        assert not marker.exists(), f"payload imported with cwd {cwd}"
    monkeypatch.syspath_prepend(str(folder))
    with pytest.raises(DpqError, match="'payload'"):
        dpq.load(folder)
    assert not marker.exists()


def test_an_installed_plugin_rebuilds_its_transform_through_its_entry_point(tiny_models, tmp_path, monkeypatch):
    site = tmp_path / "site"
    dist = site / "dpq_toy_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dpq-toy-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{transforms.ENTRY_POINTS}]\ntoy-plugin = dpq_toy_plugin\n")
    (site / "dpq_toy_plugin.py").write_text(
        "from dpq import transforms\nSEEN = []\n"
        "transforms.register(transforms.Rebuild('toy-plugin', 1, 'dpq_toy', shape=lambda m: SEEN.append(m) or m))\n")
    monkeypatch.syspath_prepend(str(site))
    folder = copy_model(tiny_models["student"], tmp_path / "m")
    edit_json(folder / "config.json", lambda c: c.update(dpq_transforms=[{"name": "toy-plugin", "version": 1}]))
    try:
        model, _ = models.load_classifier(str(folder))
        assert sys.modules["dpq_toy_plugin"].SEEN == [model]
    finally:
        transforms._TABLE.pop("toy-plugin", None)
        sys.modules.pop("dpq_toy_plugin", None)


# ----------------------------------------------------------------------------- item 8: every folder dpq writes loads


def _tiny_of(kind: str, folder: Path, vocab: list[str]) -> Path:
    """A tiny random classifier of base ``kind``, read by a BERT WordPiece tokenizer over ``vocab``."""
    ids = {w: i for i, w in enumerate(vocab)}
    common = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=128, num_labels=2, pad_token_id=ids["[PAD]"],
                  id2label={0: "0", 1: "1"}, label2id={"0": 0, "1": 1})
    if kind == "albert":
        cfg = transformers.AlbertConfig(embedding_size=16, **common)
    elif kind == "deberta-v2":
        cfg = transformers.DebertaV2Config(**common)
    else:
        cfg = transformers.ModernBertConfig(global_attn_every_n_layers=1, local_attention=16, cls_token_id=ids["[CLS]"],
                                            sep_token_id=ids["[SEP]"], bos_token_id=ids["[CLS]"],
                                            eos_token_id=ids["[SEP]"], **common)
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(cfg).save_pretrained(folder)
    transformers.BertTokenizerFast(vocab=ids, do_lower_case=True).save_pretrained(folder)
    return folder


ARCHS = ["albert", "deberta-v2"] + (["modernbert"] if hasattr(transformers, "ModernBertConfig") else [])


def _probabilities(out: str) -> list[float]:
    return [json.loads(line)["probability"] for line in out.strip().splitlines()]


def test_every_folder_dpq_writes_loads_in_dpq(capsys, tmp_path, sst2_slice):
    """``dpq quantize`` writes ``dpq-<base>`` folders for bases outside dpq's first six; predict, export, evaluate (in a
    fresh process, every folder at once) and ``pipeline()`` all read them and agree on their probabilities."""
    vocab, written = _vocab(sst2_slice), []
    for kind in ARCHS:
        src, q, e = _tiny_of(kind, tmp_path / kind, vocab), tmp_path / f"q-{kind}", tmp_path / f"e-{kind}"
        code, _, err = cli(capsys, "quantize", "--method", "rtn", "--model", src, "--out", q, "--data", sst2_slice)
        assert code == 0, err
        assert json.loads((q / "config.json").read_text())["model_type"] == f"dpq-{kind}"
        code, out, err = cli(capsys, "predict", q, *TEXTS, "--json")
        assert code == 0, err
        torch_p = _probabilities(out)
        code, _, err = cli(capsys, "export", "--precision", "fp32", "--model", q, "--out", e)
        assert code == 0, err
        code, out, err = cli(capsys, "predict", e, *TEXTS, "--json")
        assert code == 0 and _probabilities(out) == pytest.approx(torch_p, abs=1e-4), err
        clf = transformers.pipeline("text-classification", model=str(q))
        assert [row["score"] for row in clf(TEXTS)] == pytest.approx(torch_p, abs=1e-4)
        written += [q, e]
    r = dpq_cmd("evaluate", *written, "--data", sst2_slice, "--batch-sizes", "1", "--latency-rounds", "1",
                "--latency-repeats", "1", "--warmup", "0")
    assert r.returncode == 0, r.stderr
    assert all(r.stdout.count(f"| {d.name} |") == 1 for d in written), r.stdout


# ----------------------------------------------------------------------------- item 5: tokenizer and weights


def test_a_model_without_its_tokenizer_or_with_foreign_weights_is_refused(capsys, tiny_models, tmp_path, sst2_slice):
    student = tiny_models["student"]
    art = sealed(student, tmp_path / "sealed", "distill")
    (art / "tokenizer.json").unlink()  # listed in the manifest: the folder is no longer what was sealed
    one_line_error(*cli(capsys, "predict", art, "a good film")[::2], "tokenizer.json", "missing")
    with pytest.raises(DpqError, match="tokenizer.json"):
        dpq.load(art)

    bare = copy_model(student, tmp_path / "bare")  # a plain folder: config and weights, no vocabulary files
    for name in ("tokenizer.json", "vocab.txt"):
        (bare / name).unlink()
    out = tmp_path / "teacher"
    refused(dpq_cmd("teacher", "--model", bare, "--data", sst2_slice, "--out", out, *FAST),
            "no usable tokenizer", "tokenizer.json", "vocab.txt")
    assert not out.exists()

    renamed = copy_model(student, tmp_path / "renamed")
    weights = load_file(renamed / "model.safetensors")
    save_file({k.replace("bert.", "encoder."): v for k, v in weights.items()}, str(renamed / "model.safetensors"))
    refused(dpq_cmd("evaluate", renamed, "--data", sst2_slice), "weights do not match the bert architecture",
            "missing", "bert.embeddings")

    fewer = copy_model(student, tmp_path / "fewer-layers")  # a config that uses only part of its checkpoint
    edit_json(fewer / "config.json", lambda c: c.update(num_hidden_layers=1))
    with pytest.raises(DpqError, match=r"no place for \(bert\.encoder\.layer\.1\."):
        models.load_classifier(str(fewer))

    # the encoder alone, as sentence-transformers folders ship it: a new head (and pooler) is what training makes
    headless = copy_model(student, tmp_path / "headless")
    save_file({k: v for k, v in weights.items() if k.startswith("bert.") and ".pooler." not in k},
              str(headless / "model.safetensors"))
    model, _ = models.load_classifier(str(headless), label_names=["0", "1"])
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, weights["bert.embeddings.word_embeddings.weight"])


# ----------------------------------------------------------------------------- item 9: KD across tokenizers


def test_hidden_state_distillation_across_tokenizers_is_refused(tiny_models, tmp_path, sst2_slice):
    vocab = _vocab(sst2_slice)
    words = vocab[len(SPECIALS):]
    other = make_tiny(tmp_path / "other", SPECIALS + words[1::2], hidden=48, layers=4, seed=2)  # half the words: [UNK]
    teacher = sealed(other, tmp_path / "teacher", "teacher")
    out = tmp_path / "distilled"
    refused(dpq_cmd("distill", "--teacher", teacher, "--student", tiny_models["student"], "--hidden-weight", "1",
                    "--data", sst2_slice, "--out", out, *FAST), "split the training sentences differently",
            "hidden_weight")
    assert not out.exists()

    s_tok = models.load_tokenizer(str(tiny_models["student"]))
    hidden = KDConfig(hidden_weight=1.0, attention_weight=1.0)
    texts = [" ".join(words[:4]), " ".join(words[4:8])]  # words[0] is not in the other vocabulary
    same = models.load_tokenizer(str(copy_model(tiny_models["student"], tmp_path / "same-vocab-elsewhere")))
    check_same_tokens(hidden, s_tok, same, texts)  # by content, not path
    renumbered = make_tiny(tmp_path / "renumbered", SPECIALS + words[::-1], seed=4)  # same pieces, other ids
    check_same_tokens(hidden, s_tok, models.load_tokenizer(str(renumbered)), texts)
    unknown = f"token 1 is {words[0]!r} for the student, '<unk>' for the teacher"
    with pytest.raises(DpqError, match=re.escape(unknown)):
        check_same_tokens(hidden, s_tok, models.load_tokenizer(str(other)), texts)
    check_same_tokens(KDConfig(), s_tok, models.load_tokenizer(str(other)), texts)  # logit KD needs no shared tokens


def test_run_refuses_what_a_later_stage_cannot_take_before_the_teacher_trains(tmp_path, tiny_models, sst2_slice):
    """Hidden-state KD across tokenizers, a student max_length past its positions: said before the teacher trains."""
    vocab = _vocab(sst2_slice)
    other = make_tiny(tmp_path / "other", SPECIALS + vocab[len(SPECIALS):][1::2], seed=3)  # half the words: [UNK]
    small = dict(epochs=1, max_train_samples=16, batch_size=16)
    for name, distill, needles in (
            ("tokens", dict(student=str(other), hidden_weight=1.0), ("split the training sentences", "hidden_weight")),
            ("positions", dict(student=str(tiny_models["student"]), max_length=200),
             ("distill.max_length 200", "position limit (128 tokens)"))):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(json.dumps({"name": name, "data": str(sst2_slice), "baseline": {"enabled": False},
                                      "teacher": dict(small, model=str(tiny_models["teacher"]), max_length=32),
                                      "distill": dict(small, **distill), "prune": {"enabled": False},
                                      "quantize": {"enabled": False}, "export": {"enabled": False}}))
        run = tmp_path / f"run-{name}"
        refused(dpq_cmd("run", recipe, "--out", run), *needles)
        assert not run.exists()  # nothing trained, nothing written


# ----------------------------------------------------------------------------- items 12 and 13: one line, exit 2


def _three_classes(folder: Path) -> Path:
    folder.mkdir()
    rows = "".join(f"{w} film\t{i % 3}\n" for i, w in enumerate(["good", "bad", "fine", "dull", "great", "awful"] * 4))
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text("sentence\tlabel\n" + rows)
    return folder


def _with_a_long_row(sst2: Path, folder: Path) -> Path:
    shutil.copytree(sst2, folder)
    with open(folder / "train.tsv", "a") as f:
        f.write(" ".join(["good"] * 300) + "\t1\n")
    return folder


class _Refused:
    def __reduce__(self):
        return (os.getcwd, ())


def test_inputs_a_model_cannot_take_end_in_one_line_before_any_work(capsys, tiny_models, tmp_path, sst2_slice):
    student = tiny_models["student"]
    out = tmp_path / "out"

    long_data = _with_a_long_row(sst2_slice, tmp_path / "long")
    refused(dpq_cmd("teacher", "--model", student, "--data", long_data, "--out", out, "--epochs", "1",
                    "--max-length", "200"), "max_length 200", "position limit (128 tokens)")
    one_line_error(*cli(capsys, "teacher", "--model", student, "--data", _three_classes(tmp_path / "three"), "--out",
                        out, *FAST)[::2], "classification head has 2 classes", "the data has 3")
    bad = copy_model(student, tmp_path / "bad-config")
    text = (bad / "config.json").read_text()
    (bad / "config.json").write_text(text[: len(text) // 2])
    refused(dpq_cmd("predict", bad, "a good film"), f"{bad / 'config.json'}: not valid JSON")
    assert not out.exists()

    pickled = copy_model(student, tmp_path / "pickled")
    weights = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(dict(weights, extra=_Refused()), pickled / "pytorch_model.bin")
    one_line_error(*cli(capsys, "predict", pickled, "a good film")[::2], "pytorch_model.bin", "never unpickles",
                   "GLOBAL")

    no_pad = copy_model(student, tmp_path / "no-pad")
    edit_json(no_pad / "config.json", lambda c: c.update(pad_token_id=None))
    edit_json(no_pad / "tokenizer_config.json", lambda c: c.update(pad_token=None))
    one_line_error(*cli(capsys, "predict", no_pad, "a good film")[::2], "no pad token")
    edit_json(no_pad / "config.json", lambda c: c.update(pad_token_id=0))  # one side naming it is enough
    model, tok = models.load_classifier(str(no_pad))
    assert tok.pad_token == "[PAD]" and model.config.pad_token_id == 0

    q, e = tmp_path / "q", tmp_path / "e"
    assert cli(capsys, "quantize", "--method", "rtn", "--model", student, "--out", q, "--data", sst2_slice)[0] == 0
    assert cli(capsys, "export", "--precision", "fp32", "--model", student, "--out", e)[0] == 0
    hand_edited = copy_model(q, tmp_path / "hand-edited")
    edit_json(hand_edited / "config.json", lambda c: c.update(dpq_quant="int4"))
    one_line_error(*cli(capsys, "predict", hand_edited, "a good film")[::2], "dpq_quant is a str")
    cut = copy_model(e, tmp_path / "cut")
    for folder in (e, cut):  # sealed: every listed file is verified; plain: the record itself is read with care
        info = (folder / "export.json").read_bytes()
        (folder / "export.json").write_bytes(info[: len(info) // 2])
    one_line_error(*cli(capsys, "predict", e, "a good film")[::2], "export.json", "checksum")
    one_line_error(*cli(capsys, "predict", cut, "a good film")[::2], "export.json: not valid JSON")
