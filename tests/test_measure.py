import math
from types import SimpleNamespace

import pytest
import torch

from dpq import measure, models


def bert_flops(L, d, ffn, layers, labels=2):
    """Forward FLOPs of a BERT classifier by hand (2 per multiply-add), attention's L^2 terms included."""
    per_layer = 2 * L * d * d * 4 + 2 * L * d * ffn * 2 + 2 * L * L * d * 2
    return layers * per_layer + 2 * d * d + 2 * d * labels


@pytest.mark.parametrize("seq", [8, 16, 33])
def test_gflops_count_attention_exactly(tiny_models, seq):
    model, _ = models.load_classifier(str(tiny_models["student"]))  # hidden 32, ffn 64, 2 layers
    serving = model.config._attn_implementation
    assert measure.gflops_per_example(model, seq) * 1e9 == pytest.approx(bert_flops(seq, 32, 64, 2))
    assert model.config._attn_implementation == serving  # counted under eager, then put back


def test_weights_size_counts_weight_files_only(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 2_000_000)
    (tmp_path / "model.onnx").write_bytes(b"x" * 500_000)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 900_000)
    assert measure.weights_size_mb(tmp_path) == pytest.approx(2.5)


def test_latency_is_median_of_repeats(monkeypatch):
    """A fake clock that each call advances by a known time: the median is known, and differs from the mean
    and the minimum; warm-up calls and each block's first call (0.5 s here) are not counted."""
    clock = [0.0]
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def model(seconds):
        it = iter(seconds)
        return lambda: clock.__setitem__(0, clock[0] + next(it))

    w = 0.5
    a = model([w, w, 0.001, 0.009, w, 0.002, 0.100, w, 0.003, 0.004])  # timed: 1 9 2 100 3 4 ms, median 3.5
    b = model([w, w, 0.005, 0.005, w, 1.000, 0.005, w, 0.006, 0.004])  # timed: 5 5 1000 5 6 4 ms, median 5
    out = measure.interleaved_latency_ms([{"ms": a}, {"ms": b}], rounds=3, repeats=2, warmup=1, settle_s=0)
    assert out == [{"ms": pytest.approx(3.5)}, {"ms": pytest.approx(5.0)}]


class _Lookup(torch.nn.Module):
    """Logits read from a table by each example's first token, so every prediction is known by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def test_evaluate_model_accuracy():
    from dpq.data import EncodedSplit

    ln3 = math.log(3)  # softmax([ln 3, 0]) = [0.75, 0.25]
    model = _Lookup([[ln3, 0.0], [0.0, ln3], [ln3, 0.0], [ln3, 0.0]])
    # lengths 4, 1, 2, 3: the loader batches them by length, out of dataset order
    ds = EncodedSplit([[0, 7, 7, 7], [1], [2, 7], [3, 7, 7]], labels=[0, 1, 1, 0])
    m = measure.evaluate_model(model, ds, {"input_ids": 9}, batch_size=2)
    # examples 0, 1, 3 right with p(label) = 0.75; example 2 wrong with p(label) = 0.25
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["loss"] == pytest.approx((3 * math.log(4 / 3) + math.log(4)) / 4)


def test_interleaved_latency_times_every_model_every_round():
    order = []
    fns = [{"a": lambda: order.append("m0")}, {"a": lambda: order.append("m1"), "b": lambda: order.append("m1b")}]
    out = measure.interleaved_latency_ms(fns, rounds=3, repeats=2, warmup=1, settle_s=0)
    assert [set(o) for o in out] == [{"a"}, {"a", "b"}]
    timed = order[3:]  # after one warm-up call each; each block opens with one untimed call
    assert timed == (["m0"] * 3 + ["m1"] * 3 + ["m1b"] * 3) * 3


def test_interleaved_latency_lets_the_previous_model_settle(monkeypatch):
    """Each block opens with the pause (the last model's runtime threads park) and an untimed call."""
    order = []
    monkeypatch.setattr(measure.time, "sleep", lambda s: order.append(f"sleep {s}"))
    fns = [{"a": lambda: order.append("m0")}, {"a": lambda: order.append("m1")}]
    measure.interleaved_latency_ms(fns, rounds=2, repeats=1, warmup=0, settle_s=0.05)
    assert order == ["sleep 0.05", "m0", "m0", "sleep 0.05", "m1", "m1"] * 2
