"""The ``dpq`` command. Flags are generated from the recipe dataclasses, so a flag and a recipe key
always mean the same thing. User mistakes end in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import re
import signal
import sys
import threading
import typing
import unicodedata
from pathlib import Path

from .errors import DpqError

log = logging.getLogger("dpq")

TRAIN_HELP = "training settings"


def _add_settings(parser: argparse.ArgumentParser, cls, *, skip=(), title: str | None = None) -> None:
    group = parser.add_argument_group(title or "settings")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(dest=f.name, default=None, help=f"{f.metadata.get('help', '')} (default: {default}"
                                                   f"{_bounds_text(f.metadata)})")
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif "choices" in f.metadata:
            group.add_argument(flag, type=tp, choices=[c for c in f.metadata["choices"] if c is not None], **kw)
        elif tp is list or typing.get_origin(tp) is list:
            group.add_argument(flag, nargs="+", type=int if f.name in ("layer_map", "batch_sizes") else str,
                               metavar=f.metadata.get("metavar"), **kw)
        else:
            group.add_argument(flag, type=tp, metavar=f.name.upper(), **kw)


def _bounds_text(meta) -> str:
    """A setting's limits for its help text, e.g. "; >= 1, <= 1000" (the recipe refuses values outside them)."""
    parts = [f"{op} {meta[k] if isinstance(meta[k], int) else f'{meta[k]:g}'}"
             for k, op in (("min", ">="), ("gt", ">"), ("max", "<="), ("lt", "<")) if k in meta]
    return "; " + ", ".join(parts) if parts else ""


def _given(args, cls, skip=()) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in skip and getattr(args, f.name, None) is not None}


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="folder of train/dev files, TRAIN,DEV paths, or hub id NAME[:CONFIG] "
                                  "(default: $DPQ_DATA, else nyu-mll/glue:sst2)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows instead of refusing the file")


def _holdout_args(p: argparse.ArgumentParser) -> None:
    from .recipe import DataSettings

    _add_settings(p, DataSettings, skip=("path", "labels", "skip_bad_rows"), title="held-out selection split")


def _data_settings(args):
    """The command's data section: --data (else $DPQ_DATA, else the default) and the held-out split's flags."""
    from .recipe import DataSettings, build

    given = {k: v for k, v in _given(args, DataSettings).items() if k not in ("path", "skip_bad_rows")}
    return build(DataSettings, dict(given, path=args.data or os.environ.get("DPQ_DATA") or DataSettings().path,
                                    skip_bad_rows=args.skip_bad_rows), "data")


def _load_data(args, need=("train", "dev"), hold_out: bool = True):
    from .data import load_data
    from .pipeline import load_stage_data

    d = _data_settings(args)
    if hold_out:
        return load_stage_data(d, need), d
    return load_data(d.path, skip_bad_rows=d.skip_bad_rows, need=need), d


def build_parser() -> argparse.ArgumentParser:
    from .recipe import EvaluateSettings, TargetSettings

    parser = argparse.ArgumentParser(prog="dpq", description="Distill, Prune, Quantize transformer text classifiers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=("auto", "cpu", "cuda"),
                        help="where to train and evaluate: auto (a GPU when torch sees one), cpu, or cuda "
                             "(default: auto; for `run`, the recipe's device:). Latency is always measured on the CPU")

    p = sub.add_parser("run", parents=[common],
                       help="run a recipe's stages end to end (finished, unchanged stages are skipped)")
    p.add_argument("recipe", help="recipe YAML file, e.g. recipes/sst2.yaml")
    p.add_argument("--profile", help="profile from the recipe's profiles section (e.g. fast, full)")
    p.add_argument("--out", help="run folder (default: runs/NAME-PROFILE)")
    p.add_argument("--data", help="override the recipe's data (default: $DPQ_DATA, else the recipe's)")
    p.add_argument("--dry-run", action="store_true", help="say which stages would run and why, run nothing")

    from .registry import COMMANDS as STAGES
    from .registry import always as _always

    for stage in STAGES.values():  # one subcommand per declared stage: its inputs, fan-out and settings as flags
        p = sub.add_parser(stage.name, parents=[common], help=stage.help)
        for i in stage.inputs:
            p.add_argument(f"--{i.name}", required=i.needed is _always, help=i.help)
        if stage.fanout is not None:
            p.add_argument(f"--{stage.fanout.name}", required=True, choices=stage.fanout.choices(),
                           help=stage.fanout.help)
        p.add_argument("--out", required=True, help="artifact folder to write")
        p.add_argument("--force", action="store_true", help="redo even if --out is complete with the same settings")
        for flag, kw in stage.flags:
            p.add_argument(flag, **kw)
        if stage.data:
            _data_args(p)
            _holdout_args(p)
        _add_settings(p, stage.settings, skip=stage.skip, title=f"{stage.name} settings")

    p = sub.add_parser("report", parents=[common], help="report.md/json and Pareto plots of a run's evaluation")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder (from `dpq run`)")
    _add_settings(p, TargetSettings, title="target (default: the run recipe's target: section)")

    p = sub.add_parser("predict", parents=[common],
                       help="label and probability for texts, from any model or exported folder")
    p.add_argument("model", metavar="MODEL", help="model folder: PyTorch, packed 4-bit, or an ONNX export")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    p.add_argument("--file", help="UTF-8 file, one text per line")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")

    p = sub.add_parser("evaluate", parents=[common], help="accuracy, size, GFLOPs and latency of model folders")
    p.add_argument("models", nargs="+", metavar="DIR", help="model folders")
    p.add_argument("--json", help="also write the rows to this JSON file")
    _data_args(p)
    _add_settings(p, EvaluateSettings, title="evaluation settings")
    return parser


def _cmd_run(args) -> None:
    from .pipeline import run_recipe

    run_recipe(args.recipe, profile=args.profile, out=args.out, data=args.data, dry_run=args.dry_run,
               device=args.device)


def _cmd_stage(args) -> None:
    """Any declared stage alone: the same settings, input checks, key and runner as in `dpq run`. The output folder
    is checked (dpq's to replace, none of the inputs) before any data is read or lock taken."""
    from . import artifacts, locks
    from .pipeline import data_inputs, run_stage, stage_status
    from .recipe import build
    from .registry import COMMANDS as STAGES
    from .registry import MODEL_SETTINGS
    from .stages import check_writable

    stage = STAGES[args.command]
    settings = build(stage.settings, _given(args, stage.settings, skip=stage.skip), stage.name)
    inputs = {i.name: Path(getattr(args, i.name)) if getattr(args, i.name) else None for i in stage.inputs}
    choice = {stage.fanout.name: getattr(args, stage.fanout.name)} if stage.fanout else {}
    stage.check(choice, inputs, settings)
    data_settings = _data_settings(args) if stage.data else None
    key = stage.key(settings, data=data_settings and dataclasses.asdict(data_settings), choice=choice,
                    inputs=inputs)
    out = Path(args.out)
    if args.force or stage_status(out, key)[0]:  # a stage that is skipped writes nothing, wherever it is
        artifacts.check_replaceable(out, stage.name)
        read = [(f"--{k}", v) for k, v in inputs.items()]
        read += [(f"--{f}", getattr(settings, f)) for f in MODEL_SETTINGS if getattr(settings, f, None)]
        read += [("--extra-teachers", t) for t in getattr(settings, "extra_teachers", None) or ()]
        if data_settings is not None:
            read += data_inputs(data_settings.path, "--data")
        artifacts.check_not_input(out, read)
        check_writable(out, create=False)
        locks.check_free(out)
    data = _load_data(args)[0] if stage.data else None
    name = "-".join([stage.name, *choice.values()])
    run_stage(name, out, key, lambda: stage.run(settings, choice, inputs, data, out, key),
              trains=stage.trains(choice), force=args.force)


def _cmd_report(args) -> None:
    from .recipe import TargetSettings
    from .report import write_report

    out = write_report(Path(args.run_dir), _given(args, TargetSettings))
    print(out / "report.md")


def _cmd_predict(args) -> None:
    from .predict import load, read_lines
    from .recipe import MAX_BATCH

    if not 1 <= args.batch_size <= MAX_BATCH:
        raise DpqError(f"--batch-size must be >= 1 and <= {MAX_BATCH} (got {args.batch_size})")
    texts = list(args.texts) + (read_lines(Path(args.file)) if args.file else [])
    if not texts:
        raise DpqError("nothing to classify: give texts or --file FILE (- reads standard input)")
    predictor = load(args.model)
    for text, p in zip(texts, predictor.predict(texts, batch_size=args.batch_size)):
        if args.json:
            print(_json_line({"label": p.label, "probability": round(p.probability, 6), "truncated": p.truncated,
                              "text": text[:200]}))
        else:
            print(f"{printable(p.label)}\t{p.probability:.4f}\t{printable(text[:70])}{'…' if len(text) > 70 else ''}")


def _unprintable(ch: str) -> bool:
    # control (Cc: ESC starts terminal sequences, C1's CSI too), format (Cf: bidi overrides reorder what is shown),
    # unassigned, private use, surrogates, and the line/paragraph separators some terminals break lines on
    return unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp")


def printable(text: str) -> str:
    """``text`` safe to write to a terminal: every character that could move the cursor, retitle the window or
    reorder the line is shown as its escape (``\\x1b``, ``\\u202e``), so the output is what the input held."""
    return "".join(ascii(ch)[1:-1] if _unprintable(ch) else ch for ch in text)


def _json_line(obj) -> str:
    """One JSON object, readable and safe on a terminal: the characters ``printable`` escapes become ``\\uXXXX``,
    JSON's own escape, so a JSON reader gets the text back exactly."""
    return "".join(_json_escape(ch) if _unprintable(ch) else ch for ch in json.dumps(obj, ensure_ascii=False))


def _json_escape(ch: str) -> str:
    units = ch.encode("utf-16-be", "surrogatepass")  # beyond U+FFFF: a surrogate pair, as JSON writes it
    return "".join(f"\\u{int.from_bytes(units[i:i + 2], 'big'):04x}" for i in range(0, len(units), 2))


def _cmd_evaluate(args) -> None:
    from . import artifacts
    from .recipe import EvaluateSettings, build
    from .stages import evaluate_dirs, format_table

    settings = build(EvaluateSettings, _given(args, EvaluateSettings), "evaluate")
    for d in args.models:
        if not Path(d).is_dir():
            raise DpqError(f"{d}: no such model folder")
    if args.json:
        _check_json_out(Path(args.json), [Path(d) for d in args.models])
    data, _ = _load_data(args, need=(settings.split,), hold_out=False)
    rows = evaluate_dirs([Path(d) for d in args.models], data, settings)
    print(format_table(rows))
    if args.json:
        artifacts.write_json_atomic(Path(args.json), rows)


def _check_json_out(path: Path, models: list[Path]) -> None:
    """Refuse an ``--json`` file that could not be written, before the evaluation (minutes) rather than after."""
    if path.is_dir():
        raise DpqError(f"--json {path}: is a folder; give a file name, e.g. {path / 'results.json'}")
    if path.exists() and not path.is_file():
        raise DpqError(f"--json {path}: exists and is not a file")
    where = path.resolve()
    inside = next((m for m in models if where.is_relative_to(m.resolve())), None)
    if inside is not None:  # a model's own config.json or manifest overwritten by its measurements
        raise DpqError(f"--json {path}: inside the model folder {inside}; write the rows elsewhere")
    if path.is_file() and not _is_evaluate_json(path):
        raise DpqError(f"--json {path}: exists and is not an earlier `dpq evaluate --json` file; dpq overwrites only "
                       "what it wrote: choose another name")
    parent = next(p for p in where.parents if p.exists())
    if not parent.is_dir():
        raise DpqError(f"--json {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise DpqError(f"--json {path}: {parent} is not writable")


def _is_evaluate_json(path: Path) -> bool:
    """What ``dpq evaluate --json`` writes: a list of rows, each naming its model and runtime (a file of rows an
    older dpq wrote, or one cut short by hand, is still dpq's to replace: ``report.read_results`` is stricter)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) and {"name", "runtime"} <= r.keys() for r in rows)


COMMANDS = {"run": _cmd_run, "evaluate": _cmd_evaluate, "report": _cmd_report, "predict": _cmd_predict}


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large (the file-size limit, "
             "`ulimit -f`, or the file system's)", getattr(errno, "EDQUOT", -1): "disk quota exceeded"}


def _disk_full(exc: BaseException) -> tuple[str, str | None] | None:
    """(what, file) when ``exc`` (or what caused it) is a write that found no room. Some writers wrap the OS error
    in their own (safetensors: ``SafetensorError … (os error 28)``), so their message is read as well."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return DISK_FULL[exc.errno], exc.filename
        found = re.search(r"os error (\d+)", str(exc))
        if found and int(found[1]) in DISK_FULL:
            return DISK_FULL[int(found[1])], None
        exc = exc.__cause__ or exc.__context__
    return None


def _terminated(signum, frame) -> None:
    # SIGTERM (docker stop, Slurm preemption, Kubernetes) takes Ctrl-C's path: training checkpoints and says how to
    # resume, everything else stops where it is, temporary folders removed
    raise KeyboardInterrupt


def _install_signals() -> dict:
    """Our handlers, and the ones they replace (restored when ``main`` returns: it also runs inside other programs,
    such as the tests)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return {}
    # over `ulimit -f` the kernel kills the process outright; ignored, the write fails with EFBIG, said below
    wanted = {signal.SIGTERM: _terminated, getattr(signal, "SIGXFSZ", None): signal.SIG_IGN}
    return {sig: signal.signal(sig, handler) for sig, handler in wanted.items() if sig is not None}


def main(argv: list[str] | None = None) -> int:
    previous = _install_signals()
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the command started (importing torch, building the parser)
        print("dpq: interrupted", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="dpq: %(message)s",
                        stream=sys.stderr, force=True)
    try:
        _quiet_libraries()
        from . import devices

        devices.set_choice(args.device or "auto")
        devices.quiet_other_processes()
        COMMANDS.get(args.command, _cmd_stage)(args)
        sys.stdout.flush()  # inside the try: a reader that left early (`| head`) surfaces here, not at exit
    except BrokenPipeError:
        # Python's documented remedy: point stdout at devnull so the interpreter's final flush is quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except DpqError as e:
        print(f"dpq: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # training says so itself (a DpqError); this is any other moment
        resumable = args.command not in ("predict", "evaluate", "report")
        print("dpq: interrupted" + ("; finished stages are kept, run the same command again to go on" if resumable
                                    else ""), file=sys.stderr)
        return 130
    except Exception as e:
        full = _disk_full(e)
        if full is None:
            raise
        what, file = full
        print(f"dpq: error: {what}{f' writing {file}' if file else ''}; earlier results are kept (a stage writes "
              "into a temporary folder until it is complete): make room and run the same command again",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
