"""Model cards: every model folder dpq writes carries a ``README.md`` with the Hugging Face Hub's metadata header,
so the folder can be pushed to a model hub as it is.

A card says where the model comes from (its base model and data, followed back through the run's manifests: each
stage's settings name the key of the artifact it read), the dpq settings that made it, its structure, how to load
it, and what the run's evaluation measured: the rows of ``evaluation/results.json``, the same rows ``dpq report``
builds its tables from. A stage writes the card when it seals its folder, before anything is measured; ``dpq report``
rewrites the cards of the run from the evaluation. The card is the one file a manifest does not checksum
(``artifacts.CARD``), so rewriting it neither makes a folder look damaged nor changes the settings hash that
stage skipping compares.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import yaml

from . import artifacts, locks
from .errors import DpqError

log = logging.getLogger("dpq")

MODEL_KINDS = ("teacher", "baseline", "distill", "prune", "quantize", "export")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
OLD_FORMAT = ("dpq_transforms", "dpq_kept_heads", "dpq_vocab_original", "dpq_quant")  # transformed, but type bert…
KEY = re.compile(r"^[0-9a-f]{16}$")  # an input named by the settings hash of the artifact it was (artifacts.py)


# ----------------------------------------------------------------------------- where a model comes from


def _hub_id(name: str | None) -> str | None:
    """``name`` when it names something on a model or dataset hub rather than a local path."""
    if not name or Path(name).expanduser().exists() or not HUB_ID.fullmatch(name):
        return None
    return name


def lineage(settings: dict, siblings: Path) -> list[tuple[str, dict]]:
    """(folder, settings) of each artifact this one was made from, nearest first, as far as ``siblings`` (the run
    folder) holds them: a stage's ``model``/``student`` setting is the settings hash of the artifact it read, or a
    model id or path at the start of the chain."""
    known = {}
    for d in sorted(Path(siblings).iterdir()) if Path(siblings).is_dir() else []:
        m = artifacts.read_manifest(d) if d.is_dir() else None
        if m and m.get("kind") in MODEL_KINDS:
            known[m["settings_hash"]] = (d.name, m.get("settings", {}))
    chain, seen = [], set()
    src = settings.get("student", settings.get("model"))
    while isinstance(src, str) and src in known and src not in seen:
        seen.add(src)
        chain.append(known[src])
        src = known[src][1].get("student", known[src][1].get("model"))
    return chain


def _origin(settings: dict, chain: list[tuple[str, dict]]) -> tuple[str | None, dict | None]:
    """(the model id the chain starts from, the data it was trained on)."""
    every = [settings] + [s for _, s in chain]
    last = every[-1]
    root = last.get("student", last.get("model"))
    root = None if not isinstance(root, str) or KEY.fullmatch(root) else root
    data = next((s["data"] for s in every if isinstance(s.get("data"), dict)), None)
    return root, data


def _dataset(data: dict | None) -> dict:
    path = (data or {}).get("path") or ""
    hub = _hub_id(path.split(":", 1)[0]) if "," not in path else None
    if hub:
        out = {"type": hub, "name": hub.rsplit("/", 1)[-1]}
        if ":" in path:
            out["config"] = path.split(":", 1)[1]
            out["name"] = out["config"]
        return out
    name = Path(path.split(",")[0]).name if path else "unknown"
    return {"type": name, "name": name}


# ----------------------------------------------------------------------------- the card


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _runtime(kind: str, config: dict, export: dict) -> str:
    if kind == "export":
        return export.get("runtime", "onnx")
    quant = config.get("dpq_quant")
    return f"torch-dequantized-int{quant['bits']}" if quant else "torch-fp32"


def _tags(kind: str, config: dict, export: dict) -> list[str]:
    tags = ["dpq", "text-classification"]
    if config.get("dpq_kept_heads"):
        tags.append("pruned")
    if config.get("dpq_vocab_original"):
        tags.append("vocabulary-trimmed")
    if config.get("dpq_quant"):
        tags.append(f"{config['dpq_quant']['bits']}-bit")
    if kind == "distill":
        tags.append("knowledge-distillation")
    if kind == "export":
        tags += ["onnx", export.get("precision", "fp32")]
    return tags


def _accuracy(row: dict, data: dict, name: str) -> dict:
    split = "validation" if row.get("split") in ("dev", "validation", "valid", "val") else row.get("split", "dev")
    return {"task": {"type": "text-classification", "name": "Text Classification"},
            "dataset": dict(_dataset(data), split=split),
            "metrics": [{"type": "accuracy", "value": row["accuracy"], "name": name, "verified": False}]}


def _measured_by_stage(folder: Path) -> dict | None:
    """The dev accuracy a training stage measured once on the model it saved (its ``metrics.json``): what a card
    shows until an evaluation of the run (size, latency, the same accuracy) replaces it."""
    m = _read_json(folder / "metrics.json")
    acc = m.get("accuracy")
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not 0 <= acc <= 1:
        return None
    out = {"accuracy": acc, "split": "dev"}
    if m.get("selected_on"):
        out["checkpoint_chosen_on"] = m["selected_on"]
    if isinstance(m.get("selection_accuracy"), (int, float)):
        out["selection_accuracy"] = m["selection_accuracy"]
    return out


def metadata(folder: Path, kind: str, settings: dict, rows: dict[str, dict], data: dict | None,
             siblings: Path, name: str) -> dict:
    """The Hub metadata header. ``rows``: evaluation rows by folder name (this folder's and its exports')."""
    folder = Path(folder)
    config, export = _read_json(folder / "config.json"), _read_json(folder / "export.json")
    chain = lineage(settings, siblings)
    base, trained_on = _origin(settings, chain)
    data = data or trained_on
    meta: dict = {"library_name": "onnx" if kind == "export" else "transformers", "pipeline_tag": "text-classification",
                  "tags": _tags(kind, config, export)}
    if _hub_id(base):
        meta["base_model"] = base
        meta["base_model_relation"] = "quantized" if config.get("dpq_quant") or kind == "export" else "finetune"
    if _hub_id(_dataset(data)["type"]):
        meta["datasets"] = [_dataset(data)["type"]]
    own = rows.get(name)
    results = []
    if own is not None:
        results.append(_accuracy(own, data, f"accuracy ({own['runtime']}, {own.get('split', 'dev')} split)"))
    else:  # a packed 4-bit folder is measured through its exports (the same codes, run by ONNX Runtime)
        for export_name, row in rows.items():
            results.append(_accuracy(row, data, f"accuracy ({row['runtime']}, {row.get('split', 'dev')} split, "
                                                f"as its export {export_name})"))
    measured = _measured_by_stage(folder) if not rows else None
    if measured:
        results.append(_accuracy(measured, data, f"accuracy ({_runtime(kind, config, export)}, "
                                                 f"{measured['split']} split, measured by the {kind} stage)"))
    if results:
        meta["model-index"] = [{"name": f"{Path(siblings).name}-{name}", "results": results}]
    meta["dpq"] = {"stage": kind, "runtime": _runtime(kind, config, export),
                   "evaluation": {n: {k: v for k, v in r.items() if k != "model"} for n, r in rows.items()}}
    if measured:
        meta["dpq"]["measured_by_stage"] = measured
    taught = _read_json(folder / "metrics.json")
    if taught.get("teachers"):
        meta["dpq"].update(teachers=taught["teachers"], teacher_combine=taught.get("teacher_combine"))
    return meta


COMBINED = {"average": "the mean of their softened distributions as one target",
            "per-teacher": "a KD term each"}


def _teaching(metrics: dict) -> list[str]:
    """Which teachers the student learnt from (KD stages record them in metrics.json), and how they combined."""
    teachers = metrics.get("teachers") or []
    if len(teachers) < 2:
        return [f"Distilled from `{teachers[0]}`.", ""] if teachers else []
    how = COMBINED.get(metrics.get("teacher_combine"), metrics.get("teacher_combine"))
    learned = metrics.get("gor_w_kd")
    weights = (f"; learned GoR weights: task {metrics['gor_w_task']:.3f}, KD "
               + ", ".join(f"{w:.3f}" for w in (learned if isinstance(learned, list) else [learned]))
               if learned is not None else "")
    return [f"Distilled from {len(teachers)} teachers ({how}{weights}): "
            + ", ".join(f"`{t}`" for t in teachers) + ".", ""]


def _use(kind: str, config: dict, export: dict) -> str:
    if kind == "export":
        off = export.get("ort_disabled_optimizers") or []
        opts = f", disabled_optimizers={off!r}" if off else ""
        return ("```python\n"
                "import dpq                           # pip install 'dpq[onnx]'\n"
                "print(dpq.load(\"path/to/this/folder\").predict([\"a gorgeous, witty film\"]))\n\n"
                "import onnxruntime as ort           # ONNX Runtime alone: inputs input_ids, attention_mask -> logits\n"
                f"session = ort.InferenceSession(\"path/to/this/folder/model.onnx\"{opts})\n"
                "```\n")
    if any(k in config for k in OLD_FORMAT) and not str(config.get("model_type", "")).startswith("dpq-"):
        return ("Written by a dpq older than its Hugging Face classes: `dpq.load(\"path/to/this/folder\")` loads it "
                "(`from_pretrained` cannot rebuild its shapes).\n")
    if not str(config.get("model_type", "")).startswith("dpq-"):
        return ("```python\nfrom transformers import pipeline\n\n"
                "clf = pipeline(\"text-classification\", model=\"path/to/this/folder\")\n```\n")
    return ("```python\nfrom transformers import pipeline\n\n"
            "import dpq  # dpq installed: importing it registers the classes that rebuild this model's shapes\n"
            "clf = pipeline(\"text-classification\", model=\"path/to/this/folder\")\n\n"
            "# without dpq: the modeling code saved in this folder (modeling_dpq.py)\n"
            "clf = pipeline(\"text-classification\", model=\"path/to/this/folder\", trust_remote_code=True)\n"
            "```\n")


def _structure(config: dict, export: dict) -> list[str]:
    lines = []
    if config.get("dpq_kept_heads"):
        heads = [len(h) for h in config["dpq_kept_heads"]]
        of_heads = config.get("num_attention_heads", config.get("n_heads"))  # DistilBERT names them its own way
        of_ffn = config.get("intermediate_size", config.get("hidden_dim"))
        lines.append(f"- pruned: attention heads per layer {heads} (of {of_heads}), "
                     f"FFN width per layer {config.get('dpq_ffn_sizes')} (of {of_ffn})")
    if config.get("dpq_vocab_original"):
        lines.append(f"- vocabulary trimmed: {config.get('vocab_size')} of {config['dpq_vocab_original']} embedding "
                     "rows kept; other tokens read as [UNK] (the tokenizer is unchanged)")
    q = config.get("dpq_quant")
    if q:
        where = (f"its codes and scales stored in `model.onnx`, run on {export.get('kernels', 'int4')} kernels"
                 if export else "stored packed in `model.quant.safetensors`; `from_pretrained` loads it as the "
                                "dequantized float weights (the exact grid it was quantized to)")
        lines.append(f"- quantized: {q.get('method')}, {q.get('bits')}-bit, group size {q.get('group_size')}, "
                     f"embeddings {q.get('embeddings')}-bit; {where}")
    return lines


def _table(rows: dict[str, dict]) -> list[str]:
    sizes = sorted({int(k[13:]) for r in rows.values() for k in r if re.fullmatch(r"latency_ms_bs\d+", k)})
    head = "| folder | runtime | accuracy | examples | params | size MB | GFLOPs | " + "".join(
        f"bs{b} ms | " for b in sizes)
    lines = [head.rstrip(), "|" + " --- |" * 2 + " ---: |" * (5 + len(sizes))]
    for name, r in rows.items():
        lat = "".join(f"{r[f'latency_ms_bs{b}']} | " if f"latency_ms_bs{b}" in r else "– | " for b in sizes)
        lines.append(f"| {name} | {r['runtime']} | {r['accuracy']:.4f} | {r.get('examples', '')} | "
                     f"{r.get('params', 0) / 1e6:.2f} M | {r.get('size_mb')} | {r.get('gflops')} | {lat}".rstrip())
    hw = next(iter(rows.values())).get("hardware", {})
    seq = next(iter(rows.values())).get("seq_len")
    lines += ["", f"Accuracy on the {next(iter(rows.values())).get('split', 'dev')} split. Latency: median ms per "
                  f"batch of {seq}-token inputs on {hw.get('cpu', '?')}, {hw.get('threads', '?')} threads "
                  f"({hw.get('cores', '?')} cores), torch {hw.get('torch', '?')}; all the run's models were timed "
                  "round-robin in one process (`evaluation/results.json`)."]
    return lines


def render(folder: Path, kind: str, settings: dict, rows: dict[str, dict], data: dict | None, siblings: Path,
           name: str | None = None) -> str:
    """The card of ``folder`` (``name``: the folder's final name, when it is still being written under another)."""
    folder = Path(folder)
    name = name or folder.name
    meta = metadata(folder, kind, settings, rows, data, siblings, name)
    config, export = _read_json(folder / "config.json"), _read_json(folder / "export.json")
    chain = lineage(settings, siblings)
    base = f" Base model: `{meta['base_model']}`." if "base_model" in meta else ""
    body = [f"# {Path(siblings).name}-{name}", "",
            f"A text classifier from a dpq run (Distill, Prune, Quantize): stage `{kind}`, runtime "
            f"`{meta['dpq']['runtime']}`.{base}", ""]
    if chain:
        body += ["Made from: " + " ← ".join(f"`{n}`" for n, _ in chain), ""]
    body += _teaching(_read_json(folder / "metrics.json"))
    body += ["## Use", "", _use(kind, config, export)]
    structure = _structure(config, export)
    if structure:
        body += ["## Structure", "", *structure, ""]
    body += ["## Evaluation", ""]
    if rows and name not in rows:
        body += ["This folder is measured through its exports (the same 4-bit codes, run by ONNX Runtime):", ""]
    measured = meta["dpq"].get("measured_by_stage")
    if rows:
        body += [*_table(rows), ""]
    elif measured:
        chosen = measured.get("checkpoint_chosen_on")
        where = "the held-out slice of train" if chosen == "heldout" else f"the {chosen} split"
        how = (f" (the checkpoint chosen on {where}" + (f", accuracy {measured['selection_accuracy']:.4f}"
               if "selection_accuracy" in measured else "") + ")") if chosen else ""
        body += [f"Accuracy {measured['accuracy']:.4f} on the {measured['split']} split, measured by the `{kind}` "
                 f"stage on the model it saved{how}. Size and latency: `dpq evaluate` on this folder, or `dpq run` "
                 "(its evaluation fills in this section).", ""]
    else:
        body += ["Not measured yet: `dpq run` (or `dpq evaluate` and `dpq report` on the run) fills this in.", ""]
    body += ["## dpq settings", "", "```yaml", yaml.safe_dump(settings, sort_keys=True).rstrip(), "```", ""]
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{header}---\n\n" + "\n".join(body)


def front_matter(text: str) -> dict:
    """The YAML header of a card (what the Hub reads)."""
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---\n", 4)
    return yaml.safe_load(text[4:end]) if end > 0 else {}


def write(folder: Path, *, kind: str, settings: dict, rows: dict[str, dict] | None = None, data: dict | None = None,
          siblings: Path | None = None, name: str | None = None) -> Path:
    """Write (atomically) ``folder``'s card; unchanged text is not rewritten. ``siblings``: the folder holding the
    artifacts it was made from (its run), by default its parent."""
    folder = Path(folder)
    text = render(folder, kind, settings, rows or {}, data, Path(siblings) if siblings else folder.parent, name)
    path = folder / artifacts.CARD
    if path.is_file() and path.read_text() == text:
        return path
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_run(run_dir: Path, results: list[dict], evaluation: dict | None) -> list[Path]:
    """Rewrite the card of every model folder of ``run_dir`` with the evaluation's rows: its own row, or the rows of
    the exports made from it. A row measured on another version of a folder (the folder was rebuilt since) is not
    written into its card."""
    run_dir = Path(run_dir)
    data = (evaluation or {}).get("settings", {}).get("data")
    manifests = {d.name: m for d in sorted(run_dir.iterdir()) if d.is_dir()
                 and (m := artifacts.read_manifest(d)) and m.get("kind") in MODEL_KINDS}
    rows = {}
    for r in results:
        m = manifests.get(r["name"])
        if m is None:
            continue
        if r.get("artifact") not in (None, m["settings_hash"]):
            log.warning("%s: evaluated before it was rebuilt; its card keeps no measurements until the run is "
                        "evaluated again", run_dir / r["name"])
            continue
        rows[r["name"]] = r
    written = []
    for name, m in manifests.items():
        mine = {name: rows[name]} if name in rows else {}
        mine.update({e: rows[e] for e, em in manifests.items()
                     if e in rows and e != name and em.get("kind") == "export"
                     and em.get("settings", {}).get("model") == m["settings_hash"]})
        folder = run_dir / name
        try:
            with locks.hold(folder):
                written.append(write(folder, kind=m["kind"], settings=m.get("settings", {}), rows=mine, data=data,
                                     siblings=run_dir))
        except DpqError as e:  # a stage is writing that folder right now: it will seal its own card
            log.warning("model card of %s not updated: %s", folder, e)
    return written
