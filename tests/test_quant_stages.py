"""quantize / export / evaluate through the CLI on tiny models: what a user runs, end to end."""

import json

import numpy as np
import pytest
import torch

from dpq import load_model, measure
from dpq.cli import main
from dpq.data import encode_split, load_data, pad_ids
from dpq.onnx import runtime
from dpq.quant.packed import FILE

FAST = ["--epochs", "1", "--max-train-samples", "48", "--batch-size", "16", "--max-length", "48"]


def cli(capsys, *args):
    code = main([str(a) for a in args])
    return code, *capsys.readouterr()


@pytest.fixture
def teacher(capsys, tmp_path, tiny_models, sst2_slice):
    t = tmp_path / "teacher"
    code, _, err = cli(capsys, "teacher", "--model", tiny_models["teacher"], "--data", sst2_slice, "--out", t, *FAST)
    assert code == 0, err
    return t


def _read(folder):
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.parametrize("flags", [["--loss-weights", "fixed"], ["--loss-weights", "gor"],
                                   ["--loss-weights", "gor", "--ensemble", "--act-bits", "8"]])
def test_qat_trains_logs_and_exports_int4_that_matches(capsys, tmp_path, tiny_models, sst2_slice, teacher, flags):
    q = tmp_path / "q"
    code, _, err = cli(capsys, "quantize", "--method", "qat", "--model", tiny_models["student"], "--teacher", teacher,
                       "--data", sst2_slice, "--out", q, "--group-size", "16", *flags, *FAST, "--log-every", "1")
    assert code == 0, err
    m = _read(q)
    rows = [json.loads(line) for line in (q / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == m["train_steps"]  # a row per step
    if "gor" in flags:
        assert all(r["gor_w_task"] > 0 and r["gor_w_kd"] > 0 for r in steps)
        assert steps[-1]["gor_w_kd"] != steps[0]["gor_w_kd"]  # the balance moved
    model, _ = load_model(q)  # packed file reloads in PyTorch

    e = tmp_path / "e4"
    code, _, err = cli(capsys, "export", "--model", q, "--out", e, "--precision", "int4", "--int4-kernels", "nbits",
                         "--accuracy-level", "0")
    assert code == 0, err
    info = json.loads((e / "export.json").read_text())
    assert info["runtime"] == "onnx-int4" and info["runtime_ops"].get("MatMulNBits", 0) > 0
    from dpq.onnx import runtime
    session = runtime.ort_session(e / "model.onnx")
    ids = torch.randint(5, model.config.vocab_size, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits.numpy()
    assert abs(runtime.ort_logits(session, ids, mask) - ref).max() < 1e-3  # fp32 math on the same integer grid


def test_ptq_export_evaluate_sizes_and_runtimes(capsys, tmp_path, tiny_models, sst2_slice):
    s = tiny_models["student"]
    outs = {}
    for method in ("rtn", "gptq"):
        outs[method] = tmp_path / method
        code, _, err = cli(capsys, "quantize", "--method", method, "--model", s, "--data", sst2_slice, "--out",
                           outs[method], "--group-size", "16", "--calibration-samples", "32")
        assert code == 0, err
        assert (outs[method] / FILE).is_file() and not (outs[method] / "model.safetensors").exists()
    exports = {}
    for prec, src in (("fp32", s), ("int8", s), ("int4", outs["gptq"])):
        exports[prec] = tmp_path / f"e-{prec}"
        code, _, err = cli(capsys, "export", "--model", src, "--out", exports[prec], "--precision", prec)
        assert code == 0, err
    info = json.loads((exports["int4"] / "export.json").read_text())  # kernels timed here, the fastest kept
    times = info["candidates_ms"]
    kinds = {"nbits-level0", "nbits-level4", "int8"}
    assert kinds <= set(times) <= kinds | {"int8 -SkipLayerNormFusion"}
    assert all(set(t) == {"bs1", "bs32"} for t in times.values())
    geo = {k: np.log(list(t.values())).mean() for k, t in times.items()}
    best = min(geo, key=geo.get)
    assert info["int4_kernels"] == best.split(" ")[0]
    assert info["ort_disabled_optimizers"] == (["SkipLayerNormFusion"] if best.endswith("Fusion") else [])
    ops = info["runtime_ops"]
    if info["int4_kernels"] == "int8":
        assert info["accuracy_level"] is None and ops.get("QAttention") and not ops.get("MatMulNBits")
    else:
        assert info["accuracy_level"] == int(info["int4_kernels"][-1]) and ops.get("MatMulNBits")
    code, out, err = cli(capsys, "evaluate", *exports.values(), "--data", sst2_slice, "--json", tmp_path / "r.json",
                         "--latency-repeats", "1", "--latency-rounds", "1", "--warmup", "0")
    assert code == 0, err
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["runtime"] for r in rows] == ["onnx-fp32", "onnx-int8", "onnx-int4"]
    # tiny graphs: see the size test below
    assert max(rows[1]["size_mb"], rows[2]["size_mb"]) < 0.5 * rows[0]["size_mb"]
    assert all(0 <= r["accuracy"] <= 1 and r["latency_ms_bs32"] > 0 for r in rows)
    assert rows[0]["params"] == rows[2]["params"]
    # an int8 file's accuracy is taken one sentence per call: its activation scales span the whole batch, so in
    # batches a sentence's logits would depend on its neighbours and on how dev happens to be batched
    session, _, tok, _ = runtime.load_onnx_folder(exports["int8"], threads=1)
    dev = encode_split(load_data(str(sst2_slice)).split("dev"), tok, 512)
    alone, batched = (measure.accuracy_and_loss(runtime.ort_predict_logits(session, dev, pad_ids(tok), batch_size=b),
                                                dev.labels)["loss"] for b in (1, 64))
    assert rows[1]["loss"] == pytest.approx(alone, rel=1e-6) and alone != pytest.approx(batched, rel=1e-6)


@pytest.mark.parametrize("args, message", [
    (["quantize", "--method", "qat", "--model", "{s}", "--out", "{tmp}/q"], "give --teacher"),
    (["quantize", "--method", "rtn", "--model", "{s}", "--out", "{tmp}/q", "--bits", "3"], "invalid choice"),
    (["export", "--model", "{s}", "--out", "{tmp}/e", "--precision", "int4"], "not a 4-bit model"),
    (["quantize", "--method", "gptq", "--model", "{tmp}/none", "--out", "{tmp}/q"], "no model folder"),
])
def test_quantize_export_mistakes(capsys, tmp_path, tiny_models, sst2_slice, args, message):
    args = [a.format(s=tiny_models["student"], tmp=tmp_path) for a in args]
    if args[0] == "quantize":
        args += ["--data", str(sst2_slice)]
    try:
        code, _, err = cli(capsys, *args)
    except SystemExit as e:  # argparse's own refusal of a bad choice
        code, err = e.code, capsys.readouterr()[1]
    assert code == 2 and message in err
    assert not (tmp_path / "q").exists() and not (tmp_path / "e").exists()


def test_quantizing_a_quantized_model_is_refused(capsys, tmp_path, tiny_models, sst2_slice):
    q = tmp_path / "q"
    assert cli(capsys, "quantize", "--method", "rtn", "--model", tiny_models["student"], "--data", sst2_slice,
               "--out", q, "--group-size", "16")[0] == 0
    code, _, err = cli(capsys, "quantize", "--method", "rtn", "--model", q, "--data", sst2_slice,
                       "--out", tmp_path / "q2")
    assert code == 2 and "already quantized" in err


def test_corrupt_packed_file_is_refused(capsys, tmp_path, tiny_models, sst2_slice):
    q = tmp_path / "q"
    assert cli(capsys, "quantize", "--method", "rtn", "--model", tiny_models["student"], "--data", sst2_slice,
               "--out", q, "--group-size", "16")[0] == 0
    data = (q / FILE).read_bytes()
    (q / FILE).write_bytes(data[: len(data) // 2])
    code, _, err = cli(capsys, "evaluate", q, "--data", sst2_slice)
    assert code == 2 and FILE in err and "checksum" in err


def test_trimmed_vocabulary_gives_the_same_logits_on_seen_tokens(capsys, tmp_path, tiny_models, sst2_slice):
    from dpq.data import load_data
    from dpq.onnx import runtime

    s = tiny_models["student"]
    full, trim = tmp_path / "full", tmp_path / "trim"
    for out, extra in ((full, []), (trim, ["--trim-vocab"])):
        code, _, err = cli(capsys, "quantize", "--method", "rtn", "--model", s, "--data", sst2_slice, "--out", out,
                           "--group-size", "16", *extra)
        assert code == 0, err
    m = _read(trim)
    a, tok = load_model(full)
    b, _ = load_model(trim)
    assert m["kept_tokens"] < a.config.vocab_size == b.config.dpq_vocab_original
    assert sum(p.numel() for p in b.parameters()) < sum(p.numel() for p in a.parameters())
    seen = tok(load_data(str(sst2_slice)).split("train").texts[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(a(**seen).logits, b(**seen).logits)
        remap = b.bert.embeddings.word_embeddings.remap
        dropped = [i for i in range(len(remap)) if remap[i] == remap[tok.unk_token_id] and i != tok.unk_token_id]
        assert dropped  # the tiny vocabulary holds dev-only words: they are not kept
        unseen = torch.tensor([[tok.cls_token_id, dropped[0], tok.sep_token_id]])
        as_unk = torch.tensor([[tok.cls_token_id, tok.unk_token_id, tok.sep_token_id]])
        assert torch.equal(b(input_ids=unseen).logits, b(input_ids=as_unk).logits)
        assert not torch.equal(a(input_ids=unseen).logits, a(input_ids=as_unk).logits)
    e = tmp_path / "e"
    assert cli(capsys, "export", "--model", trim, "--out", e, "--precision", "int4", "--int4-kernels", "nbits",
                         "--accuracy-level", "0")[0] == 0
    got = runtime.ort_logits(runtime.ort_session(e / "model.onnx"), seen["input_ids"], seen["attention_mask"])
    assert abs(got - b(**seen).logits.detach().numpy()).max() < 1e-3  # the graph remaps ids itself


def test_int4_file_is_at_most_a_fifth_of_fp32(capsys, tmp_path, sst2_slice):
    """On a model where weights, not graph overhead, fill the file (hidden 128, vocabulary 6000, group 32)."""
    from conftest import SPECIALS, make_tiny

    folder = make_tiny(tmp_path / "mid", SPECIALS + [f"w{i}" for i in range(6000)], hidden=128, layers=2, heads=4,
                       ffn=512)
    q = tmp_path / "q"
    assert cli(capsys, "quantize", "--method", "rtn", "--model", folder, "--data", sst2_slice, "--out", q)[0] == 0
    sizes = {}
    for prec, src in (("fp32", folder), ("int8", folder), ("int4", q)):
        assert cli(capsys, "export", "--model", src, "--out", tmp_path / prec, "--precision", prec)[0] == 0
        sizes[prec] = (tmp_path / prec / "model.onnx").stat().st_size
    assert sizes["int4"] <= 0.2 * sizes["fp32"], sizes
    assert sizes["int4"] < sizes["int8"] <= 0.3 * sizes["fp32"], sizes  # int8 quantizes the embeddings too


def test_gor_weighting_works_in_distillation_and_pruning(capsys, tmp_path, tiny_models, sst2_slice, teacher):
    s = tmp_path / "s"
    code, _, err = cli(capsys, "distill", "--teacher", teacher, "--student", tiny_models["student"],
                       "--data", sst2_slice, "--out", s, "--loss-weights", "gor", *FAST)
    assert code == 0, err
    p = tmp_path / "p"
    code, _, err = cli(capsys, "prune", "--model", s, "--teacher", teacher, "--data", sst2_slice, "--out", p,
                       "--loss-weights", "gor", "--update-every", "1", *FAST)
    assert code == 0, err
    for folder in (s, p):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        assert rows and all("gor_w_task" in r and "gor_w_kd" in r for r in rows)


def test_trim_can_keep_the_first_ids(tiny_models, sst2_slice):
    from dpq import models
    from dpq.data import load_data
    from dpq.quant.vocab import used_token_ids

    _, tok = models.load_classifier(str(tiny_models["student"]))
    texts = load_data(str(sst2_slice)).split("train").texts
    plain, more = used_token_ids(tok, texts, 64), used_token_ids(tok, texts, 64, keep_first=40)
    assert set(range(40)) <= set(more) and set(plain) < set(more)
