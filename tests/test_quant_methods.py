"""A quantization method is one function and its registration: the CLI, the recipe, the packed checkpoint and the
int4 export take it with no other change."""

import json

import pytest

from dpq.cli import main
from dpq.errors import DpqError
from dpq.quant import methods
from dpq.quant.fake import quantize_rtn, with_fp16_scales
from dpq.recipe import QuantizeSettings


@pytest.fixture
def toy_method():
    calls = []

    @methods.register("toy-rtn")
    def toy(model, linears, cfg, calibration):
        """Round-to-nearest under a name of its own: what matters here is the wiring, not the rounding."""
        calls.append(sorted(linears))
        out = {}
        for name, lin in linears.items():
            q = with_fp16_scales(lin.weight.data,
                                 quantize_rtn(lin.weight.data, cfg.bits, cfg.group_size, cfg.symmetric))
            lin.weight.data.copy_(q.dequantize())
            out[f"{name}.weight"] = q
        return out

    yield calls
    methods._METHODS.pop("toy-rtn")


def test_a_registered_method_runs_from_the_cli_and_exports(capsys, tmp_path, tiny_models, sst2_slice, toy_method):
    q, e = tmp_path / "q", tmp_path / "e"
    assert main(["quantize", "--method", "toy-rtn", "--model", str(tiny_models["student"]), "--data",
                 str(sst2_slice), "--out", str(q), "--group-size", "16"]) == 0, capsys.readouterr().err
    # 2 layers × (Q K V O in out) + pooler: every Linear but the head
    assert toy_method and len(toy_method[0]) == 2 * 6 + 1
    assert json.loads((q / "config.json").read_text())["dpq_quant"]["method"] == "toy-rtn"
    assert main(["export", "--model", str(q), "--out", str(e), "--precision", "int4", "--int4-kernels", "nbits",
                 "--accuracy-level", "0"]) == 0, capsys.readouterr().err
    assert json.loads((e / "export.json").read_text())["method"] == "toy-rtn"
    assert "toy-rtn" in methods.choices()
    QuantizeSettings(methods=["toy-rtn", "qat"])  # a recipe may list it too (validated on construction)


def test_an_unknown_method_lists_the_known_ones():
    with pytest.raises(DpqError, match="one of gptq, rtn, qat"):
        methods.get("awq")


def test_a_name_is_registered_once():
    with pytest.raises(ValueError):
        methods.register("rtn")(lambda *a: {})
