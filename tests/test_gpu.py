"""The `gpu` lane: the tiny-model pipeline end to end on CUDA. Skipped where torch sees no GPU (CI); run it with
`pytest -m gpu` on a machine that has one, and write the date and result in BENCHMARKS.md."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dpq.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


def test_tiny_run_end_to_end_on_cuda(capsys, tmp_path, tiny_models, sst2_slice):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: tiny
device: cuda
data: {sst2_slice}
teacher: {{model: {tiny_models['teacher']}, epochs: 1, max_train_samples: 96, batch_size: 16}}
baseline: {{epochs: 1, max_train_samples: 96, batch_size: 16}}
distill: {{student: {tiny_models['student']}, epochs: 1, max_train_samples: 96, batch_size: 16, hidden_weight: 1.0}}
prune: {{epochs: 1, max_train_samples: 96, batch_size: 16, heads: 0.5, ffn: 0.5, update_every: 1}}
quantize: {{methods: [gptq, qat], group_size: 16, epochs: 1, max_train_samples: 96, batch_size: 16,
           trim_vocab: true, calibration_samples: 32}}
export: {{precisions: [fp32, int8, int4], accuracy_level: 0}}
evaluate: {{latency_repeats: 1, warmup: 0}}
""")
    code = main(["run", str(recipe), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 0, err
    rows = json.loads((tmp_path / "run" / "evaluation" / "results.json").read_text())
    assert {r["name"] for r in rows} >= {"teacher", "distilled", "pruned", "export-int4-quantized-qat"}
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert (tmp_path / "run" / "report" / "report.md").is_file()


def test_cpu_and_cuda_agree_within_bf16_tolerance(capsys, tmp_path, tiny_models, sst2_slice):
    args = ["teacher", "--model", str(tiny_models["student"]), "--data", str(sst2_slice), "--epochs", "1",
            "--max-train-samples", "64", "--batch-size", "16", "--max-length", "32", "--log-every", "1"]
    assert main([*args, "--out", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    assert main([*args, "--out", str(tmp_path / "cuda"), "--device", "cuda"]) == 0
    rows = {d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
            for d in ("cpu", "cuda")}
    for a, b in zip(rows["cpu"], rows["cuda"]):
        assert b["loss"] == pytest.approx(a["loss"], abs=0.02)  # bf16 autocast on CUDA: ~3 significant digits
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cpu", "cuda"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.05
