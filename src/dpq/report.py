"""``dpq report RUN_DIR``: the evaluation of a run as a model-card table, JSON, and Pareto plots.

Every figure comes from ``RUN_DIR/evaluation/results.json`` (one ``dpq evaluate`` pass: all models timed
round-robin on one machine), so the ratios to the teacher are taken within one run. The same rows go into the model
card (``README.md``) of every model folder of the run (``cards.py``).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

from . import artifacts, cards
from .errors import DpqError
from .extras import require

log = logging.getLogger("dpq")

LATENCY = re.compile(r"latency_ms_bs(\d+)")


def batch_sizes(results: list[dict]) -> list[int]:
    """The batch sizes every model was timed at (``evaluate.batch_sizes``), ascending."""
    timed = [{int(m[1]) for k in r if (m := LATENCY.fullmatch(k))} for r in results]
    return sorted(set.intersection(*timed)) if timed else []


def costs(sizes: list[int]) -> dict[str, str]:
    return {"size_mb": "on-disk size (MB)", **{f"latency_ms_bs{b}": f"latency, batch {b} (ms)" for b in sizes}}


def pareto(rows: list[dict], cost: str) -> list[str]:
    """Names of the rows no other row beats on both accuracy (higher) and ``cost`` (lower)."""
    front = []
    for r in rows:
        dominated = any(o is not r and o["accuracy"] >= r["accuracy"] and o[cost] <= r[cost]
                        and (o["accuracy"] > r["accuracy"] or o[cost] < r[cost]) for o in rows)
        if not dominated:
            front.append(r["name"])
    return front


def build_rows(results: list[dict]) -> list[dict]:
    teacher = next((r for r in results if r["name"] == "teacher"), results[0])
    sizes = batch_sizes(results)
    rows = []
    for r in results:
        row = {"name": r["name"], "stage": r.get("stage", r["name"]), "runtime": r["runtime"],
               "accuracy": r["accuracy"], "params": r["params"], "size_mb": r["size_mb"], "gflops": r["gflops"],
               **{f"latency_ms_bs{b}": r[f"latency_ms_bs{b}"] for b in sizes},
               "accuracy_vs_teacher": round(r["accuracy"] - teacher["accuracy"], 4),
               "smaller_than_teacher": round(teacher["size_mb"] / r["size_mb"], 2),
               **{f"faster_than_teacher_bs{b}": round(teacher[f"latency_ms_bs{b}"] / r[f"latency_ms_bs{b}"], 2)
                  for b in sizes}}
        if r.get("kernels"):
            row["kernels"] = r["kernels"]
        rows.append(row)
    return rows


def markdown(rows: list[dict], fronts: dict[str, list[str]], hardware: dict) -> str:
    on_front = set().union(*fronts.values()) if fronts else set()
    sizes = batch_sizes(rows)
    head = ("| model | stage | runtime | accuracy | Δ vs teacher | params | size MB | GFLOPs | "
            + "".join(f"bs{b} ms | " for b in sizes) + "× smaller | " + "".join(f"× faster bs{b} | " for b in sizes))
    lines = [head.rstrip(), "|" + " --- |" * 3 + " ---: |" * (6 + 2 * len(sizes))]
    for r in rows:
        mark = " ★" if r["name"] in on_front else ""
        lat = "".join(f"{r[f'latency_ms_bs{b}']:.{2 if b == 1 else 1}f} | " for b in sizes)
        faster = "".join(f"{r[f'faster_than_teacher_bs{b}']:.1f} | " for b in sizes)
        lines.append(f"| {r['name']}{mark} | {r['stage']} | {r['runtime']} | {r['accuracy']:.4f} | "
                     f"{100 * r['accuracy_vs_teacher']:+.1f} pt | {r['params'] / 1e6:.1f} M | {r['size_mb']:.1f} | "
                     f"{r['gflops']:.3f} | {lat}{r['smaller_than_teacher']:.1f} | {faster}".rstrip())
    hw = f"{hardware.get('cpu', '?')}, {hardware.get('threads', '?')} threads, torch {hardware.get('torch', '?')}"
    lines += ["", f"★ on the accuracy/size or accuracy/latency Pareto front. Measured on {hw}; latency is the median "
              "of repeated runs after warm-up, all models timed round-robin in one process, at the dev split's mean "
              "length. Accuracy of an ONNX row is the exported file's own, run in ONNX Runtime."]
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], fronts: dict[str, list[str]], folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for cost, label in costs(batch_sizes(rows)).items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            on = r["name"] in fronts[cost]
            ax.scatter(r[cost], r["accuracy"], s=60 if on else 30, marker="*" if on else "o",
                       color="tab:red" if on else ("black" if r["name"] == "teacher" else "tab:blue"), zorder=3)
            ax.annotate(r["name"], (r[cost], r["accuracy"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        front = sorted((r for r in rows if r["name"] in fronts[cost]), key=lambda r: r[cost])
        ax.plot([r[cost] for r in front], [r["accuracy"] for r in front], color="tab:red", lw=1, zorder=2,
                label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log scale)")
        ax.set_ylabel("dev accuracy")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        name = f"accuracy_vs_{cost.removesuffix('_mb').removeprefix('latency_ms_')}.png"
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names


def _commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                           cwd=Path(__file__).parent)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    results_path = run_dir / "evaluation" / "results.json"
    if not results_path.is_file():
        raise DpqError(f"{run_dir}: no evaluation/results.json (run `dpq run` on a recipe first)")
    try:
        results = json.loads(results_path.read_text())
    except json.JSONDecodeError:
        raise DpqError(f"{results_path}: not valid JSON") from None
    if not results:
        raise DpqError(f"{results_path}: holds no models")
    require("report", "the report's plots")
    rows = build_rows(results)
    fronts = {cost: pareto(rows, cost) for cost in costs(batch_sizes(rows))}
    hardware = results[0].get("hardware", {})
    out = run_dir / "report"
    with artifacts.artifact_dir(out, kind="report", settings={"results": artifacts.sha256_file(results_path)}) as tmp:
        figures = plots(rows, fronts, tmp)
        md = f"# {run_dir.name}: compressed models next to the teacher\n\n" + markdown(rows, fronts, hardware)
        md += "\n" + "\n".join(f"![{f}]({f})" for f in figures) + "\n"
        (tmp / "report.md").write_text(md)
        artifacts.write_json_atomic(tmp / "report.json", {"run": str(run_dir), "commit": _commit(),
                                                          "hardware": hardware, "rows": rows, "pareto": fronts,
                                                          "figures": figures})
    # the model cards draw on the same rows, so a folder pushed to a hub says what the report says
    cards.write_run(run_dir, results, artifacts.read_manifest(results_path.parent))
    log.info("report: %s", out / "report.md")
    return out
