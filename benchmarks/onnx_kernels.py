"""Which ONNX Runtime integer kernels are fastest on this CPU, for one model: int8 variants and int4 variants.

    python benchmarks/onnx_kernels.py --model runs/sst2-fast/pruned --int4 runs/sst2-fast/bench-quant/int4-gptq \
        --data ../shared/data/sst2

int8: dynamic quantization of the attention-fused graph with U8S8 (with and without reduce_range), per-tensor
U8S8, U8U8, and with the embeddings left fp32. int4 (the --int4 folder's own codes): MatMulNBits at
accuracy level 0 and 4, and the same codes expanded to int8 kernels when the session loads (``dpq.onnx.int4_int8``).
Files in which ORT fuses Add + LayerNorm into SkipLayerNormalization are also timed with that fusion switched off.
Every file is timed round-robin in this process (2 threads, batch 1 and 32 x 25 tokens, median of 8 x 5 runs
after warm-up) and its dev accuracy measured.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model

from dpq import measure, models
from dpq.data import encode_split, load_data, pad_ids
from dpq.onnx import export, int4, int8, runtime
from dpq.onnx.int4_int8 import int4_int8_kernels_onnx
from dpq.quant import packed

INT8 = [("int8 U8S8 reduce_range", QuantType.QInt8, True, True, True),
        ("int8 U8S8", QuantType.QInt8, False, True, True),
        ("int8 U8S8 per-tensor", QuantType.QInt8, False, False, True),
        ("int8 U8U8", QuantType.QUInt8, False, True, True),
        ("int8 U8S8, fp32 embeddings", QuantType.QInt8, False, True, False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="fp32 model folder")
    ap.add_argument("--int4", help="a 4-bit `dpq quantize` folder of the same model")
    ap.add_argument("--data", required=True)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model, tok = models.load_classifier(args.model)
    files = {"fp32": export.export_onnx(model.eval(), tmp / "fp32.onnx")}
    g = onnx.load(str(files["fp32"]))
    int8._explicit_heads(g)
    onnx.save(g, str(tmp / "heads.onnx"))
    fusion = FusionOptions("bert")
    fusion.enable_skip_layer_norm = False  # as dpq's int8 export: the session decides (see runtime.SLOW_FUSIONS)
    optimize_model(str(tmp / "heads.onnx"), model_type="bert", num_heads=0, hidden_size=0, opt_level=1,
                   use_gpu=False, optimization_options=fusion).save_model_to_file(str(tmp / "fused.onnx"))
    for name, wt, rr, per_channel, emb in INT8:
        ops = ["MatMul", "Attention"] + (["Gather", "EmbedLayerNormalization"] if emb else [])
        out = tmp / f"{len(files)}.onnx"
        quantize_dynamic(str(tmp / "fused.onnx"), str(out), op_types_to_quantize=ops, per_channel=per_channel,
                         reduce_range=rr, weight_type=wt, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        files[name] = out
    if args.int4:
        qm, _ = models.load_classifier(args.int4)
        q, _ = packed.load_qtensors(Path(args.int4), qm.config.dpq_quant)
        st = qm.state_dict()
        weights = {k: (st[k], v) for k, v in q.items()}
        export.export_onnx(qm.eval(), tmp / "q32.onnx")
        for level in (0, 4):
            out = tmp / f"{len(files)}.onnx"
            int4.int4_onnx(tmp / "q32.onnx", out, weights, accuracy_level=level)
            files[f"int4 level {level}"] = out
        out = tmp / f"{len(files)}.onnx"
        int4_int8_kernels_onnx(tmp / "q32.onnx", out, weights)
        files["int4 codes on int8 kernels"] = out
    ds = encode_split(load_data(args.data).split("dev"), tok, 128)
    runs = {}  # each file as ORT loads it by default, and without the fusions dpq's export may switch off
    for name, f in files.items():
        for off in runtime.session_variants(f):
            runs[name + (" (SkipLayerNorm fusion off)" if off else "")] = (f, off)
    fns, acc = [], {}
    for name, (f, off) in runs.items():
        s = runtime.ort_session(f, threads=torch.get_num_threads(), disabled_optimizers=off)
        logits = runtime.ort_predict_logits(s, ds, pad_ids(tok))
        acc[name] = (logits.argmax(-1) == torch.tensor(ds.labels)).float().mean().item()
        t = {}
        for bs in (1, 32):
            x = measure.dummy_batch(model, bs, 25)
            t[f"bs{bs}"] = lambda s=s, x=x: runtime.ort_logits(s, x["input_ids"], x["attention_mask"])
        fns.append(t)
    res = measure.interleaved_latency_ms(fns, rounds=8, repeats=5, warmup=5)
    print("| file | dev acc | size MB | bs1 ms | bs32 ms | bs32 × vs fp32 |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in zip(runs, res):
        print(f"| {name} | {acc[name]:.4f} | {runs[name][0].stat().st_size / 1e6:.2f} | "
              f"{r['bs1']:.2f} | {r['bs32']:.1f} | {res[0]['bs32'] / r['bs32']:.2f} |")
    print(f"\nhardware: {measure.hardware()}")


if __name__ == "__main__":
    main()
