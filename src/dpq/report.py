"""``dpq report RUN_DIR``: the evaluation of a run as a model-card table, JSON, and Pareto plots.

Every figure comes from ``RUN_DIR/evaluation/results.json`` (one ``dpq evaluate`` pass: all models timed
round-robin on one machine), so the ratios to the teacher are taken within one run. The same rows go into the model
card (``README.md``) of every model folder of the run (``cards.py``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
from pathlib import Path

from . import artifacts, cards, locks
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
        if r.get("heldout_accuracy") is not None:
            row["heldout_accuracy"] = r["heldout_accuracy"]
        if r.get("kernels"):
            row["kernels"] = r["kernels"]
        rows.append(row)
    return rows


def _checks(row: dict, bounds: dict) -> dict[str, tuple[float, float, bool]]:
    """Each bound of the target: (the row's value, the bound, met?)."""
    out = {}
    for k, bound in bounds.items():
        if k == "max_size_mb":
            v = row["size_mb"]
            out[k] = (v, bound, v <= bound)
        elif k == "min_accuracy":
            v = row["accuracy"]
            out[k] = (v, bound, v >= bound)
        else:  # min_speedup_bsN
            v = row[f"faster_than_teacher_bs{k.removeprefix('min_speedup_bs')}"]
            out[k] = (v, bound, v >= bound)
    return out


def _shortfall(checks: dict) -> float:
    """How far a row is from the target: the sum of its misses, each relative to its bound."""
    return sum(abs(v - b) / b for v, b, ok in checks.values() if not ok)


ACCURACY_ON = {"heldout": "heldout_accuracy", "dev": "accuracy"}


def chosen_on(rows: list[dict]) -> str:
    """Which split the recommendation ranks by: the held-out slice when every row was measured on it."""
    return "heldout" if rows and all(r.get("heldout_accuracy") is not None for r in rows) else "dev"


def recommend(rows: list[dict], bounds: dict) -> dict:
    """The most accurate model (other than the teacher) that meets every bound; if none does, the one that misses
    by least, and by how much. Most accurate on the held-out slice of train when every row has it: choosing on dev
    would make the shipped model's dev figure the best of several noisy draws instead of a measurement."""
    if not bounds:
        return {"model": None, "target": {}, "meets": []}
    candidates = [r for r in rows if r["name"] != "teacher"]
    checked = {r["name"]: _checks(r, bounds) for r in candidates}
    meets = [r for r in candidates if all(ok for _, _, ok in checked[r["name"]].values())]
    if meets:
        on = chosen_on(meets)
        best = max(meets, key=lambda r: (r[ACCURACY_ON[on]], r["accuracy"], -r["size_mb"]))
        return {"model": best["name"], "target": bounds, "meets": [r["name"] for r in meets], "chosen_on": on}
    closest = min(candidates, key=lambda r: (_shortfall(checked[r["name"]]), -r["accuracy"]), default=None)
    misses = {k: {"value": v, "bound": b} for k, (v, b, ok) in checked.get(closest["name"], {}).items() if not ok} \
        if closest else {}
    return {"model": None, "target": bounds, "meets": [], "closest": closest and closest["name"], "misses": misses}


BOUND_TEXT = {"max_size_mb": ("size ≤ {b:g} MB", "{v:.1f} MB"), "min_accuracy": ("accuracy ≥ {b:.4f}", "{v:.4f}")}


def _bound_text(k: str, b: float, v: float | None = None) -> str:
    want, got = BOUND_TEXT.get(k, (f"≥ {{b:g}}× faster than the teacher at batch {k.removeprefix('min_speedup_bs')}",
                                   "{v:.1f}×"))
    return want.format(b=b) if v is None else got.format(v=v)


def recommendation_text(rec: dict, rows: list[dict], hardware: dict) -> str:
    bounds = rec["target"]
    if not bounds:
        example = ", ".join(["max_size_mb: 8"] + [f"min_speedup_bs{b}: 20" for b in batch_sizes(rows)])
        return ("No `target:` in the recipe: every model is shown, none is recommended (set e.g. "
                f"`target: {{{example}}}`).\n")
    where = f"{hardware.get('threads', '?')} CPU threads"
    want = ", ".join(_bound_text(k, b) for k, b in bounds.items())
    by_name = {r["name"]: r for r in rows}
    if rec["model"]:
        r = by_name[rec["model"]]
        on = (f" on the held-out slice of train ({r['heldout_accuracy']:.4f}; dev is only reported)"
              if rec.get("chosen_on") == "heldout" else "")
        faster = ", ".join(f"{r[f'faster_than_teacher_bs{b}']:.1f}× at batch {b}" for b in batch_sizes(rows))
        return (f"**Ship `{r['name']}`** ({r['runtime']}): accuracy {r['accuracy']:.4f} "
                f"({100 * r['accuracy_vs_teacher']:+.1f} pt vs the teacher), {r['size_mb']:.1f} MB, faster than the "
                f"teacher {faster} — the most accurate{on} of the {len(rec['meets'])} models that meet the target "
                f"({want}; {where}).\n")
    if not rec.get("closest"):
        return f"No model to compare with the target ({want}).\n"
    miss = "; ".join(f"{_bound_text(k, m['bound'])}: has {_bound_text(k, m['bound'], m['value'])}"
                     for k, m in rec["misses"].items())
    return (f"**No model meets the target** ({want}; {where}). Closest: `{rec['closest']}`, which misses {miss}.\n")


def markdown(rows: list[dict], fronts: dict[str, list[str]], hardware: dict) -> str:
    on_front = set().union(*fronts.values()) if fronts else set()
    sizes = batch_sizes(rows)
    held = any(r.get("heldout_accuracy") is not None for r in rows)
    head = ("| model | stage | runtime | accuracy | " + ("held-out | " if held else "") + "Δ vs teacher | params | "
            "size MB | GFLOPs | " + "".join(f"bs{b} ms | " for b in sizes) + "× smaller | "
            + "".join(f"× faster bs{b} | " for b in sizes))
    lines = [head.rstrip(), "|" + " --- |" * 3 + " ---: |" * (6 + held + 2 * len(sizes))]
    for r in rows:
        mark = " ★" if r["name"] in on_front else ""
        lat = "".join(f"{r[f'latency_ms_bs{b}']:.{2 if b == 1 else 1}f} | " for b in sizes)
        faster = "".join(f"{r[f'faster_than_teacher_bs{b}']:.1f} | " for b in sizes)
        ho = "" if not held else ("— | " if r.get("heldout_accuracy") is None else f"{r['heldout_accuracy']:.4f} | ")
        lines.append(f"| {r['name']}{mark} | {r['stage']} | {r['runtime']} | {r['accuracy']:.4f} | {ho}"
                     f"{100 * r['accuracy_vs_teacher']:+.1f} pt | {r['params'] / 1e6:.1f} M | {r['size_mb']:.1f} | "
                     f"{r['gflops']:.3f} | {lat}{r['smaller_than_teacher']:.1f} | {faster}".rstrip())
    hw = f"{hardware.get('cpu', '?')}, {hardware.get('threads', '?')} threads, torch {hardware.get('torch', '?')}"
    lines += ["", f"★ on the accuracy/size or accuracy/latency Pareto front. Measured on {hw}; latency is the median "
              "of repeated runs after warm-up, all models timed round-robin in one process, at the dev split's mean "
              "length. Accuracy of an ONNX row is the exported file's own, run in ONNX Runtime one "
              "sentence per call (its dynamic int8 activation scales would otherwise depend on the batch)."
              + (" accuracy: the evaluation split, measured once; held-out: the slice of train set aside, which the "
                 "recommendation ranks by." if held else "")]
    return "\n".join(lines) + "\n"


RUNTIME_MARKERS = {"torch-fp32": "o", "onnx-fp32": "s", "onnx-int8": "^", "onnx-int4": "D"}


def _place_labels(ax, fig, points: list[tuple[float, float, str]]) -> None:
    """Names beside their points, none over another or over a point: each label takes the first of a ring of
    offsets (growing outwards, with a leader line once away from its point) whose box hits nothing placed so far."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    taken = [ax.transData.transform((x, y)) for x, y, _ in points]
    taken = [(px - 4, py - 4, px + 4, py + 4) for px, py in taken]
    offsets = [(dx * r, dy * r) for r in (1, 2, 3, 4, 5) for dx, dy in
               ((5, 4), (5, -12), (-5, 4), (-5, -12), (0, 10), (0, -18), (12, -4), (-12, -4))]
    for x, y, name in sorted(points, key=lambda p: (p[1], p[0])):
        for dx, dy in offsets:
            t = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                            ha="left" if dx >= 0 else "right",
                            arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5") if abs(dx) + abs(dy) > 20 else None)
            t.update_positions(renderer)  # an annotation is only placed at draw time
            bb = Text.get_window_extent(t, renderer)  # the text alone: a leader line may cross its own point
            box = (bb.x0 - 1, bb.y0 - 1, bb.x1 + 1, bb.y1 + 1)  # a pixel of air between neighbours
            clear = all(box[2] < o[0] or box[0] > o[2] or box[3] < o[1] or box[1] > o[3] for o in taken)
            axbb = ax.get_window_extent(renderer)
            inside = axbb.x0 <= box[0] and box[2] <= axbb.x1 and axbb.y0 <= box[1] and box[3] <= axbb.y1
            if clear and inside:
                taken.append(box)
                break
            t.remove()
        else:  # nowhere free: the first offset, overlapping rather than dropped
            t = ax.annotate(name, (x, y), xytext=offsets[0], textcoords="offset points", fontsize=7)
            t.update_positions(renderer)
            bb = Text.get_window_extent(t, renderer)
            taken.append((bb.x0, bb.y0, bb.x1, bb.y1))


def plots(rows: list[dict], fronts: dict[str, list[str]], folder: Path, rec: dict | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator

    rec = rec or {}
    teacher = next((r for r in rows if r["name"] == "teacher"), None)
    names = []
    for cost, label in costs(batch_sizes(rows)).items():
        fig, ax = plt.subplots(figsize=(9.5, 5))
        for runtime, marker in RUNTIME_MARKERS.items():
            group = [r for r in rows if r["runtime"] == runtime]
            if not group:
                continue
            ax.scatter([r[cost] for r in group], [r["accuracy"] for r in group], marker=marker, s=36, zorder=3,
                       label=runtime, color=["tab:red" if r["name"] in fronts[cost] else "tab:blue" for r in group])
        others = [r for r in rows if r["runtime"] not in RUNTIME_MARKERS]
        if others:
            ax.scatter([r[cost] for r in others], [r["accuracy"] for r in others], marker="x", s=36, zorder=3,
                       color="tab:blue", label="other")
        front = sorted((r for r in rows if r["name"] in fronts[cost]), key=lambda r: r[cost])
        ax.plot([r[cost] for r in front], [r["accuracy"] for r in front], color="tab:red", lw=1, zorder=2,
                label="Pareto front (red points)")
        chosen = next((r for r in rows if r["name"] == rec.get("model")), None)
        if chosen is not None:
            ax.scatter([chosen[cost]], [chosen["accuracy"]], s=260, facecolors="none", edgecolors="green", lw=1.8,
                       zorder=4, label="recommended")
        bound = _cost_bound(cost, rec.get("target", {}), teacher)
        ax.set_xscale("log")
        if bound is not None:
            lo, hi = ax.get_xlim()
            ax.axvspan(min(lo, bound) / 10, bound, color="green", alpha=0.08, zorder=1,
                       label="within the target's bound on this axis")
            ax.set_xlim(min(lo, bound / 1.2), max(hi, bound * 1.2))
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(label + ", log scale")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        handles = [Line2D([], [], ls="", marker=RUNTIME_MARKERS.get(lab, "x"), color="0.35")  # marker = runtime
                   if lab in RUNTIME_MARKERS or lab == "other" else h for h, lab in zip(handles, labels)]
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False)
        fig.tight_layout()
        _place_labels(ax, fig, [(r[cost], r["accuracy"], r["name"]) for r in rows])
        name = f"accuracy_vs_{cost.removesuffix('_mb').removeprefix('latency_ms_')}.png"
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names


def _cost_bound(cost: str, bounds: dict, teacher: dict | None) -> float | None:
    """The target's limit on this axis: the size bound, or the latency the speed-up bound allows."""
    if cost == "size_mb":
        return bounds.get("max_size_mb")
    b = cost.removeprefix("latency_ms_bs")
    speedup = bounds.get(f"min_speedup_bs{b}")
    return teacher[cost] / speedup if speedup and teacher else None


def _commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                           cwd=Path(__file__).parent)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def target_of(run_dir: Path, overrides: dict | None = None) -> dict:
    """The run's target (its recipe.yaml's ``target:`` section) with ``overrides`` on top, as bounds."""
    from .recipe import TargetSettings, build, read_yaml

    raw = {}
    recipe = Path(run_dir) / "recipe.yaml"
    if recipe.is_file():
        try:
            raw = (read_yaml(recipe) or {}).get("target") or {}  # bounded: the file may have been edited
        except AttributeError:
            raise DpqError(f"{recipe}: not a dpq recipe (its target: section cannot be read)") from None
    return build(TargetSettings, {**raw, **(overrides or {})}, "target").bounds()


def _number(v, low: float = 0.0, high: float = math.inf, above: bool = False) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and (v > low if above else v >= low) and v <= high)


# what the report and the cards read of each row: (test, what it must be); a row may hold more
ROW_FIELDS = {"name": (lambda v: isinstance(v, str) and bool(v.strip()), "a name"),
              "runtime": (lambda v: isinstance(v, str), "text"),
              "accuracy": (lambda v: _number(v, high=1), "a number from 0 to 1"),
              "params": (lambda v: _number(v), "a number >= 0"),
              "size_mb": (lambda v: _number(v, above=True), "a number > 0"),
              "gflops": (lambda v: _number(v), "a number >= 0")}
OPTIONAL_FIELDS = {"heldout_accuracy": (lambda v: v is None or _number(v, high=1), "a number from 0 to 1"),
                   "stage": (lambda v: isinstance(v, str), "text"), "split": (lambda v: isinstance(v, str), "text"),
                   "hardware": (lambda v: isinstance(v, dict), "a mapping"),
                   "artifact": (lambda v: v is None or isinstance(v, str), "text")}


def read_results(path: Path) -> list[dict]:
    """The evaluation's rows, checked for what the report computes with: a file edited by hand (or cut short) is
    refused in one line naming it and the row, not met by a traceback halfway through the tables."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DpqError(f"{path}: not valid JSON") from None
    except OSError as e:
        raise DpqError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(results, list):
        raise DpqError(f"{path}: expected a list of evaluation rows (as `dpq evaluate` writes), got "
                       f"{type(results).__name__}")
    if not results:
        raise DpqError(f"{path}: holds no models")
    names = set()
    for i, row in enumerate(results, 1):
        if not isinstance(row, dict):
            raise DpqError(f"{path}: row {i} is not a mapping of measurements")
        label = f"row {i}" + (f" ({row['name']})" if isinstance(row.get("name"), str) else "")
        for key, (ok, what) in ROW_FIELDS.items():
            if key not in row:
                raise DpqError(f"{path}: {label} has no {key}")
            if not ok(row[key]):
                raise DpqError(f"{path}: {label}: {key} must be {what}, got {json.dumps(row[key])[:60]}")
        for key, value in row.items():
            ok, what = OPTIONAL_FIELDS.get(key, (None, None))
            if LATENCY.fullmatch(key):
                ok, what = (lambda v: _number(v, above=True)), "a number > 0 (ms)"
            if ok is not None and not ok(value):
                raise DpqError(f"{path}: {label}: {key} must be {what}, got {json.dumps(value)[:60]}")
        if row["name"] in names:
            raise DpqError(f"{path}: {label}: a second row of the same name")
        names.add(row["name"])
    return results


def write_report(run_dir: Path, target: dict | None = None) -> Path:
    """``target``: bounds that replace the run recipe's ``target:`` values (``dpq report --max-size-mb …``)."""
    run_dir = Path(run_dir)
    results_path = run_dir / "evaluation" / "results.json"
    if not results_path.is_file():
        raise DpqError(f"{run_dir}: no evaluation/results.json (run `dpq run` on a recipe first)")
    results = read_results(results_path)
    require("report", "the report's plots")
    rows = build_rows(results)
    bounds = target_of(run_dir, target)
    for k in bounds:
        if k.startswith("min_speedup_bs") and int(k.removeprefix("min_speedup_bs")) not in batch_sizes(rows):
            raise DpqError(f"target.{k}: the evaluation timed batch sizes {batch_sizes(rows)} only")
    rec = recommend(rows, bounds)
    fronts = {cost: pareto(rows, cost) for cost in costs(batch_sizes(rows))}
    hardware = results[0].get("hardware", {})
    out = run_dir / "report"
    settings = {"results": artifacts.sha256_file(results_path), "target": bounds}
    # the run's lock covers report/: refused while a run or another report writes it (a no-op inside `dpq run`)
    with locks.hold(out), artifacts.artifact_dir(out, kind="report", settings=settings) as tmp:
        figures = plots(rows, fronts, tmp, rec)
        md = (f"# {run_dir.resolve().name}: compressed models next to the teacher\n\n"
              + recommendation_text(rec, rows, hardware) + "\n" + markdown(rows, fronts, hardware))
        md += "\n" + "\n".join(f"![{f}]({f})" for f in figures) + "\n"
        (tmp / "report.md").write_text(md)
        artifacts.write_json_atomic(tmp / "report.json", {"run": str(run_dir), "commit": _commit(),
                                                          "hardware": hardware, "recommendation": rec, "rows": rows,
                                                          "pareto": fronts, "figures": figures})
    # the model cards draw on the same rows, so a folder pushed to a hub says what the report says
    cards.write_run(run_dir, results, artifacts.read_manifest(results_path.parent))
    log.info("report: %s", out / "report.md")
    return out
