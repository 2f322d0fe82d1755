"""Distillation from several heterogeneous teachers (EKD): extra teachers of another architecture and tokenizer,
their combined targets, per-teacher GoR weights, the checks, and how `dpq run` keys a stage on a teacher it trained."""

import json
import shutil

import pytest
import torch
from conftest import SPECIALS, _vocab

from dpq import artifacts, cards, models
from dpq.cli import main
from dpq.distill import FixedWeighting, GoRWeighting, KDConfig, KDLoss, ensemble_logits, make_weighting
from dpq.errors import DpqError
from dpq.recipe import DataSettings, DistillSettings

FAST = ["--epochs", "1", "--max-train-samples", "48", "--batch-size", "16", "--max-length", "48"]


def cli(capsys, *args):
    code = main([str(a) for a in args])
    return code, *capsys.readouterr()


def make_other(folder, vocab, labels=("0", "1"), seed=3, bias=None, scale=1.0):
    """A DistilBERT with its own tokenizer: half the words, in reverse order, so no word keeps the BERT models' id.
    ``bias``, ``scale``: the classifier's bias and a factor on its weights, so that a random model's predictions are
    confident and differ from sentence to sentence."""
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertForSequenceClassification

    own = SPECIALS + [w for w in vocab if w not in SPECIALS][::-2]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(own)}, do_lower_case=True)
    torch.manual_seed(seed)
    cfg = DistilBertConfig(vocab_size=len(own), dim=24, n_layers=1, n_heads=2, hidden_dim=48,
                           max_position_embeddings=128, num_labels=len(labels),
                           id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    model = DistilBertForSequenceClassification(cfg)
    if bias is not None:
        model.classifier.bias.data = torch.tensor(bias)
    model.classifier.weight.data *= scale
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def other(tmp_path, sst2_slice):
    return make_other(tmp_path / "other", _vocab(sst2_slice))


def sealed(src, out, bias=None, version=0):
    """``src`` as a finished dpq artifact without training it (what `dpq teacher` leaves, for tests that only read);
    ``bias``: its classifier's bias; another ``version``: as if made again with other settings."""
    with artifacts.artifact_dir(out, kind="teacher", settings={"made_from": str(src), "version": version}) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        if bias is not None:
            model, _ = models.load_classifier(str(src))
            model.classifier.bias.data = torch.tensor(bias)
            model.save_pretrained(tmp)
    return out


def _session(teacher, other, sst2_slice, **kw):
    from dpq.pipeline import load_stage_data
    from dpq.stages import kd_config, kd_session

    settings = DistillSettings(student=str(teacher), max_train_samples=64, max_length=48,
                               extra_teachers=[str(other)], **kw)
    data = load_stage_data(DataSettings(path=str(sst2_slice)))
    return kd_session(settings, kd_config(settings), teacher, settings.student, data)


def _logits_by_hand(folder, texts):
    """A teacher's logits for ``texts`` through its own tokenizer, one padded batch, nothing dpq computes for it."""
    model, tok = models.load_classifier(str(folder))
    enc = tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


def test_average_target_is_the_mean_of_each_teachers_softened_distribution(tmp_path, tiny_models, sst2_slice):
    # two confident teachers that disagree: the mean of their distributions is far from the distribution of their
    # mean logits, so a target that averaged logits would fail here
    teacher = sealed(tiny_models["teacher"], tmp_path / "teacher", bias=[2.0, -2.0])
    other = make_other(tmp_path / "other", _vocab(sst2_slice), bias=[-1.0, 1.0], scale=300.0)
    t = 0.5
    ses = _session(teacher, other, sst2_slice, temperature=t)
    texts = ses.train_split.texts
    _, main_tok = models.load_classifier(str(teacher))
    _, other_tok = models.load_classifier(str(other))
    assert main_tok(texts[0])["input_ids"] != other_tok(texts[0])["input_ids"]  # the tokenizers really differ
    a, b = _logits_by_hand(teacher, texts), _logits_by_hand(other, texts)
    assert b.std(0).min() > 1e-3  # 100x the tolerance: its logits depend on what its tokenizer made of each sentence
    want = (torch.softmax(a / t, -1) + torch.softmax(b / t, -1)) / 2
    got = ses.targets(torch.arange(len(texts)), "cpu")
    assert got.shape == (64, 2) and ses.teachers == [str(teacher), str(other)]
    torch.testing.assert_close(torch.softmax(got / t, -1), want, rtol=0, atol=1e-5)
    assert (torch.softmax((a + b) / 2 / t, -1) - want).abs().min() > 0.1
    assert isinstance(ses.kd.weighting, FixedWeighting)

    per = _session(teacher, other, sst2_slice, temperature=t, teacher_combine="per-teacher", loss_weights="gor")
    rows = torch.tensor([5, 0, 17])
    main_t, other_t = per.targets(rows, "cpu")
    torch.testing.assert_close(main_t, a[rows], rtol=0, atol=1e-5)
    torch.testing.assert_close(other_t, b[rows], rtol=0, atol=1e-5)
    assert per.kd.weighting.s_kd.shape == (2,)


def test_equal_fixed_weights_per_teacher_train_the_student_as_the_average_does():
    """Σ_i KL(p_i ‖ q) = n·KL(p̄ ‖ q) + const: equal per-teacher terms and the averaged target give one gradient."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    s = torch.randn(6, 3, requires_grad=True)
    ts, y, t = [torch.randn(6, 3) * 3 for _ in range(3)], torch.randint(0, 3, (6,)), 2.0
    cfg = SimpleNamespace(num_hidden_layers=2, hidden_size=8, num_attention_heads=2)
    loss = KDLoss(KDConfig(temperature=t, alpha=0.7), cfg, cfg)
    grads = []
    for target in (ts, ensemble_logits(ts, t)):
        total, logs = loss(SimpleNamespace(logits=s), y, target)
        grads.append(torch.autograd.grad(total, s)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert {"kd0", "kd1", "kd2"} <= set(loss(SimpleNamespace(logits=s), y, ts)[1])


def test_per_teacher_gor_learns_one_weight_per_teacher():
    gor = make_weighting("gor", 0.5, kd_terms=3)
    assert make_weighting("gor", 0.5).s_kd.shape == ()  # one KD term: the two-scalar form checkpoints hold
    opt = torch.optim.Adam(gor.parameters(), lr=0.05)
    for _ in range(800):
        total, logs = gor(torch.tensor(1.0), torch.tensor([0.5, 2.0, 1.0]))
        opt.zero_grad()
        total.backward()
        opt.step()
    _, wk = gor.weights()
    torch.testing.assert_close(wk, torch.tensor([2.0, 0.5, 1.0]), rtol=0.03, atol=0.0)  # each at 1 / its loss
    assert {"gor_w_task", "gor_w_kd0", "gor_w_kd1", "gor_w_kd2"} == set(logs)
    assert gor.summary()["gor_w_kd"] == pytest.approx([2.0, 0.5, 1.0], rel=0.03)
    with pytest.raises(DpqError, match="3 KD term"):
        GoRWeighting(kd_terms=3)(torch.tensor(1.0), torch.tensor([1.0, 1.0]))


def test_distill_from_a_teacher_and_a_model_of_another_architecture_and_tokenizer(capsys, tmp_path, tiny_models,
                                                                                   sst2_slice, other):
    t, x, s = tmp_path / "teacher", tmp_path / "baseline", tmp_path / "distilled"
    sealed(tiny_models["teacher"], t)
    sealed(other, x)
    args = ["distill", "--teacher", t, "--extra-teachers", x, "--student", tiny_models["student"], "--data",
            sst2_slice, "--out", s, "--teacher-combine", "per-teacher", "--loss-weights", "gor", "--log-every", "1",
            *FAST]
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    m = json.loads((s / "metrics.json").read_text())
    assert m["teachers"] == [str(t), str(x)] and m["teacher_combine"] == "per-teacher"
    steps = [json.loads(line) for line in (s / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == m["train_steps"] == 3
    assert {"gor_w_task", "gor_w_kd0", "gor_w_kd1", "kd0", "kd1"} <= set(steps[0])
    assert steps[0]["gor_w_kd0"] == steps[0]["gor_w_kd1"] == 1.0  # the first step runs at the initial weights
    assert steps[-1]["gor_w_kd0"] != 1.0 and steps[-1]["gor_w_kd1"] != 1.0  # then each teacher's weight trains
    assert len(m["gor_w_kd"]) == 2 and m["gor_w_kd"] != [1.0, 1.0]
    card = (s / "README.md").read_text()
    assert cards.front_matter(card)["dpq"]["teachers"] == [str(t), str(x)] and "Distilled from 2 teachers" in card

    code, _, err = cli(capsys, *args)
    assert code == 0 and "skipped" in err
    sealed(other, x, version=1)  # the extra teacher made again with other settings: the distilled model is stale
    code, _, err = cli(capsys, *args)
    assert code == 0 and "settings changed: extra_teachers" in err


def test_the_extra_teachers_logits_come_from_its_own_int8_onnx_file(capsys, tmp_path, tiny_models, sst2_slice, other):
    t = sealed(tiny_models["teacher"], tmp_path / "teacher")
    code, _, err = cli(capsys, "distill", "--teacher", t, "--extra-teachers", other, "--student",
                       tiny_models["student"], "--data", sst2_slice, "--out", tmp_path / "s",
                       "--teacher-logits", "onnx-int8", *FAST)
    assert code == 0, err
    assert err.count("with the int8 ONNX teacher") == 2  # each teacher through its own int8 file
    cache = tmp_path / "cache"
    assert len(list((cache / "teacher-onnx").glob("*-int8.onnx"))) == 2
    assert len(list((cache / "teacher-logits").glob("*-onnx-int8.safetensors"))) == 2


@pytest.mark.parametrize("case, message", [
    ("missing", "extra_teachers: {x}: no such folder"),
    ("not-a-model", "extra_teachers: {x}: not a model folder (no config.json)"),
    ("other-classes", "extra_teachers: {x}: classes ['neg', 'pos'] differ from the teacher's ['0', '1']"),
    ("three-classes", "extra_teachers: {x}: classes ['0', '1', '2'] differ from the teacher's ['0', '1']"),
])
def test_extra_teacher_mistakes_are_one_line_before_anything_runs(capsys, tmp_path, tiny_models, sst2_slice, case,
                                                                  message):
    t = sealed(tiny_models["teacher"], tmp_path / "teacher")
    x = tmp_path / case
    vocab = _vocab(sst2_slice)
    if case == "not-a-model":
        x.mkdir()
    elif case == "other-classes":
        make_other(x, vocab, labels=("neg", "pos"))
    elif case == "three-classes":
        make_other(x, vocab, labels=("0", "1", "2"))
    code, _, err = cli(capsys, "distill", "--teacher", t, "--extra-teachers", x, "--student", tiny_models["student"],
                       "--data", sst2_slice, "--out", tmp_path / "s", *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"dpq: error: {message.format(x=x)}")
    assert not (tmp_path / "s").exists() and not (tmp_path / ".s.work").exists()


def test_keys_without_extra_teachers_are_those_sealed_before_the_setting_existed(tmp_path, other):
    from dpq.registry import stage_key

    plain = stage_key(DistillSettings(), data={"path": "d"}, inputs={"teacher": "t"})
    assert "extra_teachers" not in plain and "teacher_combine" not in plain  # old manifests still match
    one = stage_key(DistillSettings(extra_teachers=[str(other)]))
    per = stage_key(DistillSettings(extra_teachers=[str(other)], teacher_combine="per-teacher"))
    assert one["extra_teachers"] == per["extra_teachers"] != [str(other)]  # a plain folder: keyed by its files
    assert "teacher_combine" not in one and per["teacher_combine"] == "per-teacher"
    (other / "config.json").write_text((other / "config.json").read_text().replace('"dim": 24', '"dim": 25'))
    assert stage_key(DistillSettings(extra_teachers=[str(other)]))["extra_teachers"] != one["extra_teachers"]


RECIPE = """
data: {data}
teacher: {{model: {teacher}, epochs: 1, max_train_samples: 16, batch_size: 16}}
baseline: {{enabled: {baseline}, epochs: 1, max_train_samples: 16, batch_size: 16, lr: {lr}}}
distill: {{student: {student}, epochs: 1, max_train_samples: 16, batch_size: 16, extra_teachers: [baseline]}}
prune: {{enabled: false}}
quantize: {{enabled: false}}
export: {{enabled: false}}
evaluate: {{latency_repeats: 1, latency_rounds: 1, warmup: 0, batch_sizes: [2]}}
"""


def test_run_recipe_distils_from_the_teacher_and_the_runs_own_baseline(capsys, caplog, tmp_path, tiny_models,
                                                                        sst2_slice):
    from dpq.pipeline import Pipeline
    from dpq.recipe import load_recipe

    recipe, run = tmp_path / "r.yaml", tmp_path / "run"
    fill = dict(data=sst2_slice, teacher=tiny_models["teacher"], student=tiny_models["student"])
    recipe.write_text(RECIPE.format(**fill, baseline="true", lr="1e-4"))
    caplog.set_level("INFO", logger="dpq")
    Pipeline(load_recipe(recipe), run).run()  # `dpq run` without its report
    ran = [r.getMessage().split(":")[0] for r in caplog.records if ": running" in r.getMessage()]
    assert ran == ["teacher", "baseline", "distill", "evaluate"]  # the extra teacher is trained before distill
    m = json.loads((run / "distilled" / "metrics.json").read_text())
    assert m["teachers"] == [str(run / "teacher"), str(run / "baseline")] and m["teacher_combine"] == "average"
    baseline_key = artifacts.read_manifest(run / "baseline")["settings_hash"]
    assert artifacts.read_manifest(run / "distilled")["settings"]["extra_teachers"] == [baseline_key]

    recipe.write_text(RECIPE.format(**fill, baseline="true", lr="2e-4"))  # only the baseline changes
    todo = {name: (run_it, why) for name, run_it, why in Pipeline(load_recipe(recipe), run).run(dry_run=True)}
    assert not todo["teacher"][0] and todo["baseline"][0]
    assert todo["distill"] == (True, "settings changed: extra_teachers")

    recipe.write_text(RECIPE.format(**fill, baseline="false", lr="1e-4"))
    capsys.readouterr()  # the training's progress bars
    code, _, err = cli(capsys, "run", recipe, "--out", run, "--dry-run")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "distill.extra_teachers: baseline does not run before distill" in err
