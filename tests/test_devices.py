"""Device mix-ups caught without a GPU.

CI has no GPU, so the transforms run on a model whose tensors live on the CPU while torch's *default* device is
``meta``: any tensor a transform creates without taking the device of the tensors it meets lands on ``meta`` and
then either fails against the CPU weights or is left behind in the model, which the final check finds. The same
bug is what stops a run on a GPU (a CPU tensor meeting CUDA weights).
"""

import contextlib

import pytest
import torch

from dpq import models
from dpq.cli import main
from dpq.prune import HeadFfnMasks, PruneConfig, magnitude_scores, remove_masked, restore_structure
from dpq.quant.ptq import QuantConfig, calibration_batches, quantize_model
from dpq.quant.qat import QATConfig, convert_qat, prepare_qat
from dpq.quant.vocab import restore_vocab, trim_vocab


@contextlib.contextmanager
def default_device_elsewhere():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def tensors_of(model):
    """Every tensor the model holds: parameters, buffers, and plain tensor attributes a ``.to()`` would not move."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        yield name, t
    for mname, mod in model.named_modules():
        for attr, v in vars(mod).items():
            if torch.is_tensor(v):
                yield f"{mname}.{attr}", v


def assert_all_on_cpu(model):
    off = [n for n, t in tensors_of(model) if t.device.type != "cpu"]
    assert not off, f"tensors left off the model's device: {off[:5]}"


def tiny(tiny_models):
    model, tok = models.load_classifier(str(tiny_models["student"]))
    return model.eval(), tok


def batch(tok):
    return tok(["a charming and often affecting journey", "bleak"], padding=True, return_tensors="pt")


def test_head_and_ffn_removal_keeps_the_model_on_its_device(tiny_models):
    model, tok = tiny(tiny_models)
    with default_device_elsewhere():
        masks = HeadFfnMasks.install(model)
        masks.update(magnitude_scores(model), PruneConfig(heads=0.5, ffn=0.5, allocation="layer-adaptive"))
    with torch.no_grad():
        masked = model(**batch(tok)).logits
    with default_device_elsewhere():
        # (a CPU weight indexed by a meta index gives uninitialised memory, not an error: compare the logits)
        remove_masked(model, masks)
    assert_all_on_cpu(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch(tok)).logits, masked, rtol=1e-5, atol=1e-6)


def test_rebuilding_a_pruned_structure_keeps_the_device(tiny_models):
    model, _ = tiny(tiny_models)
    model.config.dpq_kept_heads = [[0, 2], [1]]
    model.config.dpq_ffn_sizes = [40, 20]
    with default_device_elsewhere():
        restore_structure(model)
    assert_all_on_cpu(model)


def test_vocab_trim_and_qat_convert_keep_the_device(tiny_models):
    model, tok = tiny(tiny_models)
    keep = sorted(set(tok.all_special_ids) | set(range(5, 60)))
    with default_device_elsewhere():
        trim_vocab(model, keep, tok.unk_token_id)
        prepare_qat(model, QATConfig(bits=4, group_size=16, embeddings=4))
    assert_all_on_cpu(model)
    with torch.no_grad():
        model(**batch(tok))
    with default_device_elsewhere():
        convert_qat(model)  # made a CPU remap table beside CUDA weights: the QAT stage's crash on a GPU
    assert_all_on_cpu(model)
    with torch.no_grad():
        assert torch.isfinite(model(**batch(tok)).logits).all()


def test_rebuilding_a_trimmed_vocabulary_keeps_the_device(tiny_models):
    model, _ = tiny(tiny_models)
    model.config.dpq_vocab_original = model.config.vocab_size
    with default_device_elsewhere():
        restore_vocab(model)
    assert_all_on_cpu(model)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_post_training_quantization_keeps_the_device(tiny_models, sst2_slice, method):
    from dpq.data import encode_split, load_data

    model, tok = tiny(tiny_models)
    ds = encode_split(load_data(sst2_slice).split("train"), tok, 32)
    calib = calibration_batches(ds, {"input_ids": tok.pad_token_id}, 32, batch_size=16)
    with default_device_elsewhere():
        q = quantize_model(model, QuantConfig(method=method, bits=4, group_size=16), calib)
    assert_all_on_cpu(model)
    assert all(t.codes.device.type == "cpu" for t in q.values())


def test_device_cuda_without_a_gpu_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["predict", str(tmp_path), "x", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no CUDA GPU" in err
