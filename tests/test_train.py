import json

import pytest
import torch
from torch import nn

from dpq import models
from dpq.data import encode_split, load_data
from dpq.errors import DpqError
from dpq.train import StopAt, TrainConfig, _StopForTest, train


@pytest.fixture
def setup(tiny_models, sst2_slice):
    def make():
        model, tok = models.load_classifier(str(tiny_models["student"]))
        ds = encode_split(load_data(sst2_slice).split("train"), tok, 64)
        return model, ds, {"input_ids": tok.pad_token_id}
    return make


def ce_loss(model):
    def f(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return nn.functional.cross_entropy(logits, batch["labels"]), {}
    return f


CFG = TrainConfig(epochs=2, lr=1e-3, batch_size=32, checkpoint_every=3, seed=7)  # 7 steps an epoch


def test_training_lowers_loss_and_logs(setup, tmp_path):
    model, ds, pads = setup()
    from dpq.measure import evaluate_model
    before = evaluate_model(model, ds, pads)["loss"]
    result = train(model, ce_loss(model), ds, pads, CFG, tmp_path / "w",
                   evaluate=lambda: evaluate_model(model, ds, pads))
    assert result.steps == 14
    assert result.best_metrics["loss"] < before
    rows = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in r for r in rows) and any("loss" in r for r in rows)


def test_resume_after_kill_matches_uninterrupted(setup, tmp_path):
    model, ds, pads = setup()
    train(model, ce_loss(model), ds, pads, CFG, tmp_path / "a")
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, ds, pads = setup()
    with pytest.raises(_StopForTest):  # "killed" at step 8: last checkpoint at step 6 (epoch 2, batch 1)
        train(model, ce_loss(model), ds, pads, CFG, tmp_path / "b", hooks=[StopAt(8)])
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 7 and state["epoch"] == 1  # the end-of-epoch checkpoint
    model, ds, pads = setup()  # a fresh process: weights from the pretrained folder again
    result = train(model, ce_loss(model), ds, pads, CFG, tmp_path / "b")
    assert result.steps == 14
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-6, msg=k)


def test_checkpoint_mid_epoch_resumes_same_data_order(setup, tmp_path):
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=16, checkpoint_every=4, seed=3)
    model, ds, pads = setup()
    train(model, ce_loss(model), ds, pads, cfg, tmp_path / "a")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    model, ds, pads = setup()
    with pytest.raises(_StopForTest):
        train(model, ce_loss(model), ds, pads, cfg, tmp_path / "b", hooks=[StopAt(10)])
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["batch_in_epoch"] == 8
    model, ds, pads = setup()
    train(model, ce_loss(model), ds, pads, cfg, tmp_path / "b")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-6, msg=k)


def test_nan_loss_stops_and_keeps_checkpoint(setup, tmp_path):
    model, ds, pads = setup()
    calls = {"n": 0}
    inner = ce_loss(model)

    def loss_fn(batch):
        calls["n"] += 1
        loss, logs = inner(batch)
        return (loss * float("nan") if calls["n"] == 5 else loss), logs

    with pytest.raises(DpqError, match="loss became nan at step 5"):
        train(model, loss_fn, ds, pads, CFG, tmp_path / "w")
    assert json.loads((tmp_path / "w" / "checkpoint" / "state.json").read_text())["step"] == 3


def test_ctrl_c_saves_checkpoint_and_says_how_to_resume(setup, tmp_path):
    model, ds, pads = setup()
    calls = {"n": 0}
    inner = ce_loss(model)

    def loss_fn(batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return inner(batch)

    with pytest.raises(DpqError, match="interrupted at step 4; checkpoint saved"):
        train(model, loss_fn, ds, pads, CFG, tmp_path / "w")
    assert json.loads((tmp_path / "w" / "checkpoint" / "state.json").read_text())["step"] == 4


def test_checkpoint_holds_no_pickle(setup, tmp_path):
    model, ds, pads = setup()
    with pytest.raises(_StopForTest):
        train(model, ce_loss(model), ds, pads, CFG, tmp_path / "w", hooks=[StopAt(4)])
    names = sorted(p.name for p in (tmp_path / "w" / "checkpoint").iterdir())
    assert names == ["optimizer.safetensors", "rng.safetensors", "state.json", "weights.safetensors"]


def test_loss_weighting_scalars_get_their_own_learning_rate(tiny_models):
    from dpq.distill import GoRWeighting
    from dpq.train import _param_groups

    model, _ = models.load_classifier(str(tiny_models["student"]))
    groups = _param_groups(nn.ModuleDict({"m": model, "w": GoRWeighting(lr=0.01)}), 0.01)
    own = [g for g in groups if "lr" in g]
    assert len(own) == 1 and own[0]["lr"] == 0.01 and len(own[0]["params"]) == 2 and own[0]["weight_decay"] == 0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters())) + 2


def test_head_initialisation_follows_the_seed_not_the_process(tiny_models, sst2_slice, tmp_path):
    """Two runs with the same seed give the same model even when the process used its RNG before."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from dpq.recipe import TeacherSettings
    from dpq.stages import finetune_stage

    base = tmp_path / "base"  # an encoder without a classification head, like the packaged models
    AutoModel.from_pretrained(tiny_models["student"]).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_models["student"]).save_pretrained(base)
    data = load_data(sst2_slice)
    s = TeacherSettings(model=str(base), epochs=1, max_train_samples=32, batch_size=16)
    outs = []
    for i, noise in enumerate((0, 7)):
        torch.manual_seed(noise)
        torch.rand(100)
        outs.append(finetune_stage(s, s.model, data, tmp_path / f"t{i}", kind="teacher", stage_settings={}))
    a, b = (load_file(str(o / "model.safetensors")) for o in outs)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.filterwarnings("ignore:.pin_memory. argument")
def test_the_gpu_loop_options_run_and_resume_on_the_cpu(setup, tmp_path, monkeypatch):
    """What only a GPU turns on (bf16 autocast, fused AdamW, worker-collated pinned batches, checkpoints by wall
    time, loss read once per row), exercised here where CI can see it: the loop is told it has a GPU and gets the
    CPU, where every one of those also works."""
    from dpq import devices

    monkeypatch.setattr(devices, "use_cuda", lambda: True)
    monkeypatch.setattr(devices, "device", lambda: torch.device("cpu"))
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=32, seed=7, log_every=2, checkpoint_minutes=1e-9)
    model, ds, pads = setup()
    train(model, ce_loss(model), ds, pads, cfg, tmp_path / "a")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 7, 8, 10, 12, 14]  # every log_every steps, and at epoch ends
    model, ds, pads = setup()
    with pytest.raises(_StopForTest):
        train(model, ce_loss(model), ds, pads, cfg, tmp_path / "b", hooks=[StopAt(5)])
    # checkpoints by time are decided at log rows: with a deadline already past, every row saves one
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 4
    assert (tmp_path / "b" / "checkpoint.prev").is_dir()  # the generation before it, kept for a damaged newest
    model, ds, pads = setup()
    train(model, ce_loss(model), ds, pads, cfg, tmp_path / "b")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("flags, want", [("fpu avx512f avx512_bf16 avx512_vnni", "bf16"),
                                         ("fpu amx_bf16 amx_tile", "bf16"),
                                         ("fpu avx512f avx512bw avx512_vnni", "no"),  # bf16 would be emulated: slower
                                         (None, "no")])  # no /proc/cpuinfo (macOS, Windows): fp32
def test_mixed_precision_auto_takes_bf16_only_where_the_cpu_runs_it(tmp_path, monkeypatch, flags, want):
    from dpq import devices

    info = tmp_path / "cpuinfo"
    if flags is not None:
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(devices, "CPUINFO", info)
    monkeypatch.setattr(devices, "use_cuda", lambda: False)
    assert devices.mixed_precision("auto") == want
    assert devices.mixed_precision("no") == "no" and devices.mixed_precision("bf16") == "bf16"
    monkeypatch.setattr(devices, "use_cuda", lambda: True)
    assert devices.mixed_precision("auto") == "bf16"
    with pytest.raises(DpqError, match="mixed_precision must be auto, no or bf16"):
        devices.mixed_precision("fp16")


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_bf16_trains_under_autocast_with_fp32_weights_and_resumes(setup, tmp_path, precision):
    seen = []

    def loss_fn(model):
        inner = ce_loss(model)

        def f(batch):
            head = model.classifier  # (Accelerate casts the model's outputs back to fp32: a layer shows autocast)
            out = head(torch.ones(1, head.in_features))
            seen.append((torch.is_autocast_enabled("cpu"), head.weight.dtype, out.dtype))
            return inner(batch)
        return f

    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=32, checkpoint_every=3, seed=7, mixed_precision=precision)
    model, ds, pads = setup()
    result = train(model, loss_fn(model), ds, pads, cfg, tmp_path / "a")
    bf16 = precision == "bf16"
    assert result.mixed_precision == precision
    assert set(seen) == {(bf16, torch.float32, torch.bfloat16 if bf16 else torch.float32)}
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    model, ds, pads = setup()
    with pytest.raises(_StopForTest):
        train(model, loss_fn(model), ds, pads, cfg, tmp_path / "b", hooks=[StopAt(8)])
    model, ds, pads = setup()
    train(model, loss_fn(model), ds, pads, cfg, tmp_path / "b")
    for k, v in model.state_dict().items():  # the fused AdamW's moments come back from the checkpoint too
        torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-6, msg=k)
