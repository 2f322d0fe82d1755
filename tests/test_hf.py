"""dpq folders in the Hugging Face ecosystem: pruned (uneven layers) and packed 4-bit models load with
``from_pretrained`` and run in ``pipeline`` with dpq's own logits, with dpq imported and without it."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    MPNetConfig,
    MPNetForSequenceClassification,
    pipeline,
)

import dpq
from dpq import artifacts, models, stages, stages_quant, transforms
from dpq.hf import modeling_dpq
from dpq.prune import HeadFfnMasks, PruneConfig, magnitude_scores, remove_masked
from dpq.quant.ptq import QuantConfig, quantize_model
from dpq.quant.vocab import trim_vocab, used_token_ids

TEXTS = ["a charming and often affecting journey", "bleak", "it is not good at all, and the film knows it"]


def _tiny_mpnet(tiny_models, folder: Path) -> Path:
    """The student's vocabulary on MPNet (relative-position bias shared by all layers: pruned per layer)."""
    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    torch.manual_seed(3)
    cfg = MPNetConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=130, num_labels=2, pad_token_id=0,
                      id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    MPNetForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _pruned(source: Path, out: Path) -> Path:
    """Pruned with one global ranking (a different head count and FFN width in each layer), sealed as the stage
    does."""
    model, tok = models.load_classifier(str(source))
    masks = HeadFfnMasks.install(model.eval())
    scores = magnitude_scores(model)
    scores["heads"][0], scores["ffn"][0] = scores["heads"][0] * 0.5, scores["ffn"][0] * 0.5  # layer 0 loses more
    masks.update(scores, PruneConfig(heads=0.5, ffn=0.5, allocation="layer-adaptive"))
    done = remove_masked(model, masks)
    assert len({len(k) for k in done["kept_heads"]}) > 1 and len(set(done["ffn_sizes"])) > 1
    stages._seal(model, tok, out, out.parent / f".{out.name}.work", kind="prune", settings={"heads": 0.5},
                 metrics={})
    return out


def _packed(source: Path, out: Path, texts: list[str]) -> Path:
    """A pruned model, its vocabulary trimmed to ``texts`` and quantized to packed 4-bit, sealed as the stage does."""
    model, tok = models.load_classifier(str(source))
    trim_vocab(model.eval(), used_token_ids(tok, texts, 64), tok.unk_token_id)
    q = quantize_model(model, QuantConfig(method="rtn", bits=4, group_size=16, embeddings=4))
    stages_quant._seal_quantized(model, tok, q, out, settings={"method": "rtn"}, metrics={},
                                 meta={"method": "rtn", "bits": 4, "group_size": 16})
    return out


def _dpq_logits(folder: Path) -> list[list[float]]:
    """dpq's own loader, one text at a time (as the pipeline runs them: no padding)."""
    model, tok = dpq.load_model(folder)
    with torch.no_grad():
        return [model(**tok(t, return_tensors="pt")).logits[0].tolist() for t in TEXTS]


def _pipeline_logits(clf, labels: list[str]) -> list[list[float]]:
    out = clf(TEXTS, function_to_apply="none", top_k=None)
    return [[{d["label"]: d["score"] for d in row}[name] for name in labels] for row in out]


@pytest.fixture(scope="module")
def folders(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    bert = _pruned(tiny_models["student"], root / "pruned")
    mpnet = _pruned(_tiny_mpnet(tiny_models, root / "mpnet"), root / "pruned-mpnet")
    seen = TEXTS[:2] + ["some other words the film uses"]  # TEXTS[2] has tokens the trimmed table reads as [UNK]
    return {"pruned": bert, "pruned-mpnet": mpnet, "packed": _packed(bert, root / "packed", seen)}


@pytest.mark.parametrize("name", ["pruned", "pruned-mpnet", "packed"])
def test_from_pretrained_and_pipeline_give_dpq_logits(folders, name):
    folder = folders[name]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"].startswith("dpq-") and cfg["auto_map"] and (folder / "modeling_dpq.py").is_file()
    artifacts.verify(folder)  # the modeling code is sealed with the weights
    ref = _dpq_logits(folder)

    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert type(model).__module__ == "dpq.hf.modeling_dpq"  # registered by `import dpq`: no remote code ran
    kept = [len(h) for h in config.dpq_kept_heads]
    assert [l.n_heads for l in modeling_dpq.layers(model)] == kept and len(set(kept)) > 1
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        got = [model(**tok(t, return_tensors="pt")).logits[0].tolist() for t in TEXTS]
    assert torch.allclose(torch.tensor(got), torch.tensor(ref), atol=1e-6)

    labels = [config.id2label[i] for i in range(config.num_labels)]
    piped = _pipeline_logits(pipeline("text-classification", model=str(folder)), labels)
    assert torch.allclose(torch.tensor(piped), torch.tensor(ref), atol=1e-5)


def test_packed_folder_loads_as_its_dequantized_grid(folders):
    folder = folders["packed"]
    assert not (folder / "model.safetensors").exists()
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    ours, _ = dpq.load_model(folder)
    theirs, mine = model.state_dict(), ours.state_dict()
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine)
    emb = model.bert.embeddings.word_embeddings
    assert emb.num_embeddings < emb.remap.numel() == json.loads((folder / "config.json").read_text())[
        "dpq_vocab_original"]


CHILD = textwrap.dedent("""
    import json, os, sys
    # dpq is installed in this environment (editable): take away every path entry that holds it
    sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "dpq"))]
    try:
        import dpq  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("dpq is still importable")
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, pipeline

    out = {}
    for folder in sys.argv[2:]:
        cfg = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        labels = [cfg.id2label[i] for i in range(cfg.num_labels)]
        model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        texts = json.loads(sys.argv[1])
        with torch.no_grad():
            direct = [model(**tok(t, return_tensors="pt")).logits[0].tolist() for t in texts]
        clf = pipeline("text-classification", model=folder, trust_remote_code=True)
        piped = [[{d["label"]: d["score"] for d in row}[n] for n in labels]
                 for row in clf(texts, function_to_apply="none", top_k=None)]
        out[folder] = {"direct": direct, "pipeline": piped, "module": type(model).__module__}
    print(json.dumps(out))
""")


def test_trust_remote_code_loads_without_dpq_installed(folders, tmp_path):
    """Also a folder that transformers saved again (as the Trainer does): the code goes with it, and a packed model,
    now float weights, is saved without its packing."""
    paths = {n: folders[n] for n in ("pruned", "pruned-mpnet", "packed")}
    for n in ("pruned", "packed"):
        AutoModelForSequenceClassification.from_pretrained(folders[n]).save_pretrained(tmp_path / f"{n}-resaved")
        AutoTokenizer.from_pretrained(folders[n]).save_pretrained(tmp_path / f"{n}-resaved")
        paths[f"{n}-resaved"] = tmp_path / f"{n}-resaved"
    assert "dpq_quant" not in json.loads((tmp_path / "packed-resaved" / "config.json").read_text())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(TEXTS), *map(str, paths.values())],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for n, folder in paths.items():
        ref = torch.tensor(_dpq_logits(folders[n.removesuffix("-resaved")]))
        row = got[str(folder)]
        assert row["module"].startswith("transformers_modules.")  # the folder's own copy of the code ran
        assert torch.allclose(torch.tensor(row["direct"]), ref, atol=1e-6)
        assert torch.allclose(torch.tensor(row["pipeline"]), ref, atol=1e-5)


def test_a_transform_the_modeling_file_cannot_rebuild_is_refused(folders, tmp_path):
    folder = tmp_path / "plugin"
    folder.mkdir()
    for p in folders["pruned"].iterdir():
        if p.name != artifacts.MANIFEST:
            (folder / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["dpq_transforms"].append({"name": "someones-plugin", "version": 1, "module": "plugin.mod"})
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="someones-plugin"):
        AutoModelForSequenceClassification.from_pretrained(folder)


def test_modeling_file_reads_the_versions_dpq_writes():
    """A transform version bump in dpq must reach the file saved beside the models, or folders would load wrong."""
    import dpq.prune  # noqa: F401  (registers its rebuild)
    import dpq.quant.packed  # noqa: F401
    import dpq.quant.vocab  # noqa: F401

    assert {name: transforms._TABLE[name].version for name in modeling_dpq.KNOWN} == modeling_dpq.KNOWN


def test_an_untransformed_model_stays_an_ordinary_folder(tiny_models, tmp_path):
    model, tok = models.load_classifier(str(tiny_models["student"]))
    models.save_classifier(model, tok, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["model_type"] == "bert"
    assert not (tmp_path / "plain" / "modeling_dpq.py").exists()


def test_optimum_runs_an_export_folder(folders, tmp_path):
    """Optimum's ORT classes on an exported pruned model: dpq's ONNX Runtime logits. Skipped where no Optimum release
    imports with the installed transformers (BENCHMARKS.md, issue 14)."""
    pytest.importorskip("onnxruntime")
    optimum_ort = pytest.importorskip("optimum.onnxruntime")
    try:  # the package imports lazily: the class is where a release built for older transformers fails
        ort_model = optimum_ort.ORTModelForSequenceClassification
    except ImportError as e:
        pytest.skip(f"optimum-onnx is installed but does not import with this transformers ({e})")
    from dpq.onnx import runtime
    from dpq.recipe import ExportSettings

    out = stages_quant.export_stage(ExportSettings(), "fp32", folders["pruned"], tmp_path / "export-fp32",
                                    stage_settings={})
    model = ort_model.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    got = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    session, *_ = runtime.load_onnx_folder(out)
    ref = runtime.ort_logits(session, enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(torch.as_tensor(got), torch.from_numpy(ref), atol=1e-5)


@pytest.mark.parametrize("first", ["dpq", "dpq.prune", "transformers"])
def test_import_dpq_registers_whichever_is_imported_first(folders, first):
    """`import dpq` alone does not load transformers (the command stays light), and the classes are registered by the
    time anything asks transformers for a dpq folder, whatever imported transformers first."""
    code = textwrap.dedent(f"""
        import sys
        import {first}
        import dpq
        assert ("transformers" in sys.modules) == ({first!r} != "dpq"), sorted(m for m in sys.modules if "transf" in m)
        from transformers import AutoConfig
        print(type(AutoConfig.from_pretrained(sys.argv[1])).__name__)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code, str(folders["pruned"])], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "DpqBertConfig", r.stderr[-2000:]
