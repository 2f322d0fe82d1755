"""The one training loop every stage uses (fine-tuning, distillation, and later pruning recovery and QAT).

Built on Hugging Face Accelerate: one CPU, one GPU, or many through ``accelerate launch``. A stage passes
a loss function ``loss_fn(batch) -> (loss, logs)`` and the modules it trains; the loop owns the optimizer,
schedule, clipping, evaluation, best-checkpoint keeping, resumable checkpoints and the metrics log.

Checkpoints are safetensors + JSON only (model, auxiliary modules, optimizer moments, RNG states, data
position), so resuming never unpickles anything and continues with the same data order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

from . import artifacts, devices
from .data import EncodedSplit, make_loader
from .errors import DpqError

log = logging.getLogger("dpq")


@dataclass
class TrainConfig:
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 32  # the global batch: split across processes under accelerate launch / torchrun
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_every: int = 0  # steps between evaluations; 0 = at the end of each epoch
    checkpoint_every: int = 100  # steps between resumable checkpoints on the CPU
    checkpoint_minutes: float = 10.0  # minutes between resumable checkpoints on a GPU (steps are too cheap to count)
    log_every: int = 10  # steps between metrics.jsonl rows: the loss is averaged on the device, read once per row
    mixed_precision: str = "auto"  # bf16 autocast where the hardware runs it fast (devices.mixed_precision)

    @classmethod
    def from_settings(cls, settings: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in settings.items() if k in names})


@dataclass
class TrainResult:
    best_metrics: dict
    steps: int
    seconds: float
    history: list[dict]
    mixed_precision: str = "no"


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _param_groups(modules: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, own_lr = [], [], {}
    for name, p in modules.named_parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "_dpq_lr", None):
            # loss-weighting scalars must move within a run: at a model's learning rate they would not
            own_lr.setdefault(p._dpq_lr, []).append(p)
        # biases, norms and loss-weighting scalars are not weights to shrink
        elif p.ndim < 2 or "norm" in name.lower() or getattr(p, "_dpq_no_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return groups + [{"params": ps, "weight_decay": 0.0, "lr": lr} for lr, ps in sorted(own_lr.items())]


def linear_warmup_decay(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


class _Checkpoint:
    """Resumable state in ``work_dir/checkpoint``, the one before it in ``work_dir/checkpoint.prev``.

    Written to a temp folder, then renamed; ``state.json`` records every file's size. A checkpoint that does not
    read back whole (a full disk, a copy cut short) is passed over for the previous one, else the stage starts
    over: either way one line says so. Every file is read before anything is applied, so a bad checkpoint never
    leaves the model half-loaded.
    """

    FILES = ("weights.safetensors", "optimizer.safetensors", "rng.safetensors")

    def __init__(self, work_dir: Path, fingerprint: str):
        self.dir = work_dir / "checkpoint"
        self.prev = work_dir / "checkpoint.prev"
        self.fingerprint = fingerprint

    def save(self, trainables, optimizer, scheduler, state: dict) -> None:
        tmp = self.dir.parent / ".checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(trainables, str(tmp / "weights.safetensors"))
        opt = optimizer.state_dict()
        tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in opt["state"].items()
                   for k, v in s.items() if torch.is_tensor(v)}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        meta = dict(state, fingerprint=self.fingerprint, param_groups=opt["param_groups"],
                    scheduler=scheduler.state_dict(), python_rng=random.getstate(),
                    file_sizes={n: (tmp / n).stat().st_size for n in self.FILES})
        artifacts.write_json_atomic(tmp / "state.json", meta)
        if self.dir.exists():
            shutil.rmtree(self.prev, ignore_errors=True)
            os.replace(self.dir, self.prev)
        os.replace(tmp, self.dir)

    def _read(self, folder: Path) -> tuple[dict, dict] | None:
        """(state, optimizer and RNG tensors) of a whole checkpoint; None when it was made with other settings;
        raises when damaged. The weights are only checked here (size, header): ``load`` reads them once."""
        meta = json.loads((folder / "state.json").read_text())
        if meta.get("fingerprint") != self.fingerprint:
            return None
        for name, size in meta["file_sizes"].items():
            got = (folder / name).stat().st_size
            if got != size:
                raise ValueError(f"{name} is {got} bytes, {size} were written")
        with safe_open(str(folder / "weights.safetensors"), "pt"):
            pass
        return meta, {n: load_file(str(folder / n)) for n in self.FILES if n != "weights.safetensors"}

    def load(self, trainables, optimizer, scheduler) -> dict | None:
        found = None
        for folder in (self.dir, self.prev):
            if not (folder / "state.json").is_file():
                continue
            try:
                found = self._read(folder)
            except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
                log.warning("checkpoint %s does not load (%s); %s", folder, str(e).splitlines()[0][:120],
                            "trying the previous one" if folder == self.dir else "starting the stage over")
                continue
            if found is None:
                log.info("checkpoint in %s was made with other settings; starting over", folder)
            break
        if found is None:
            return None
        meta, files = found
        load_model(trainables, str(folder / "weights.safetensors"), strict=True)  # its size and header checked
        opt_state: dict[int, dict] = {}
        for key, v in files["optimizer.safetensors"].items():
            i, k = key.split(".", 1)
            opt_state.setdefault(int(i), {})[k] = v
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
        scheduler.load_state_dict(meta["scheduler"])
        rng = files["rng.safetensors"]
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all(
                [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
        pr = meta["python_rng"]
        random.setstate((pr[0], tuple(pr[1]), pr[2]))
        return meta


def _trim_log(path: Path, step: int) -> None:
    """Drop metrics rows past ``step``: a resumed run writes them again."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class _StopForTest(Exception):
    """Simulates a kill at a given step (no checkpoint written at that moment)."""


class Hook:
    """What a stage adds to the loop, without the loop knowing the stage. Both methods get the 1-based step:
    ``after_backward`` while its gradients are still in place (before clipping and the optimizer),
    ``after_step`` once the step is counted, before any checkpoint of it. A hook's state that must survive a resume
    belongs in a module among the trainables (its buffers are checkpointed with them)."""

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass


class StopAt(Hook):
    """Stops the run after ``step`` steps, with no checkpoint at that moment: how tests simulate a kill."""

    def __init__(self, step: int):
        self.step = step

    def after_step(self, step: int) -> None:
        if step >= self.step:
            raise _StopForTest()


def train(
    trainables: torch.nn.Module,
    loss_fn: Callable[[dict], tuple[torch.Tensor, dict]],
    train_set: EncodedSplit,
    pad_ids: dict[str, int],
    cfg: TrainConfig,
    work_dir: Path,
    *,
    evaluate: Callable[[], dict] | None = None,
    best_state: Callable[[], dict[str, torch.Tensor]] | None = None,
    restore_best: Callable[[dict[str, torch.Tensor]], None] | None = None,
    fingerprint: str = "",
    desc: str = "train",
    hooks: Sequence[Hook] = (),
    best_after_step: int = 0,
) -> TrainResult:
    """Train ``trainables`` (a module holding the model and any auxiliary trained modules).

    ``evaluate()`` returns metrics with an ``accuracy`` key; the best-scoring weights (``best_state()``)
    are kept in ``work_dir/best.safetensors`` and restored at the end through ``restore_best``; evaluations
    before ``best_after_step`` are logged but cannot be best (a pruning run is only final after its schedule).
    ``hooks`` (``Hook``) see each step's gradients and its end: a pruning schedule, a test's simulated kill.
    """
    work_dir = Path(work_dir)
    main = devices.is_main()
    if main:
        work_dir.mkdir(parents=True, exist_ok=True)
    cuda = devices.use_cuda()
    nproc = devices.num_processes()
    if cfg.batch_size % nproc:
        raise DpqError(f"batch_size {cfg.batch_size} does not split evenly over {nproc} processes")
    if not devices.distributed():
        # Accelerate keeps one device and precision per process; one process may train on the CPU, then on a GPU
        # (tests, notebooks). Under a launcher the state holds the process group: left as it is.
        AcceleratorState._reset_state(reset_partial_state=True)
    precision = devices.mixed_precision(cfg.mixed_precision)
    accelerator = Accelerator(mixed_precision=precision, cpu=not cuda)
    set_seed(cfg.seed)
    # each process takes its share of every batch: N processes step through the same global batches as one
    loader = make_loader(train_set, pad_ids, cfg.batch_size, shuffle=True, seed=cfg.seed,
                         workers=2 if cuda else 0, pin_memory=cuda, shard=(devices.process_index(), nproc))
    sampler = loader.batch_sampler
    steps_per_epoch = len(sampler)
    total = max(1, steps_per_epoch * cfg.epochs)
    # fused on the CPU too: the per-tensor loop took 77 ms of MiniLM's 352 ms step, the fused kernel 13 ms (BENCHMARKS)
    optimizer = torch.optim.AdamW(_param_groups(trainables, cfg.weight_decay), lr=cfg.lr, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(total, int(cfg.warmup_ratio * total)))
    trainables, optimizer = accelerator.prepare(trainables, optimizer)

    ckpt = _Checkpoint(work_dir, fingerprint or artifacts.settings_hash(asdict(cfg)))
    metrics_log = work_dir / "metrics.jsonl"
    best_file = work_dir / "best.safetensors"
    state = ckpt.load(accelerator.unwrap_model(trainables), optimizer, scheduler)
    if state is None:
        state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "history": []}
        if main:
            metrics_log.unlink(missing_ok=True)
            best_file.unlink(missing_ok=True)
    else:
        log.info("%s: resuming from step %d (epoch %d, batch %d)", desc, state["step"], state["epoch"] + 1,
                 state["batch_in_epoch"])
        if main:
            _trim_log(metrics_log, state["step"])
            if _best_step(best_file) != (state["best"] or {}).get("step"):
                best_file.unlink(missing_ok=True)  # written after the checkpoint we resume from: made again if due
    devices.barrier()

    def log_row(row: dict) -> None:
        if main:
            with open(metrics_log, "a") as f:
                f.write(json.dumps(row) + "\n")

    # the loss stays on the device between rows: reading it every step would stall a GPU on the host
    pending = {"sum": torch.zeros((), device=accelerator.device), "n": 0, "first": state["step"] + 1, "logs": {}}

    def flush() -> None:
        """Write the averaged loss row and stop on a non-finite loss (before any checkpoint could keep it)."""
        if pending["n"] == 0:
            return
        mean = accelerator.reduce(pending["sum"], reduction="mean").item() / pending["n"]
        if not math.isfinite(mean):
            where = (f"at step {state['step']}" if pending["first"] == state["step"]
                     else f"between steps {pending['first']} and {state['step']}")
            raise DpqError(f"{desc}: loss became {mean} {where}; stopped without saving a model (last good "
                           f"checkpoint kept in {ckpt.dir}); lower the learning rate")
        log_row({"step": state["step"], "loss": mean, "lr": scheduler.get_last_lr()[0],
                 **{k: float(v) for k, v in pending["logs"].items()}})
        bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
        pending.update(sum=torch.zeros((), device=accelerator.device), n=0, first=state["step"] + 1, logs={})

    def save_checkpoint() -> None:
        flush()
        if main:
            ckpt.save(accelerator.unwrap_model(trainables), optimizer, scheduler, state)
        devices.barrier()
        last_save[0] = time.time()

    def checkpoint_due() -> bool:
        if not cuda:
            return bool(cfg.checkpoint_every) and state["step"] % cfg.checkpoint_every == 0
        if state["step"] % max(1, cfg.log_every):
            return False
        due = torch.tensor(float(time.time() - last_save[0] >= 60 * cfg.checkpoint_minutes), device=accelerator.device)
        return bool(accelerator.reduce(due, reduction="sum").item() > 0)  # every process decides alike

    def run_eval() -> None:
        if evaluate is None:
            return
        flush()
        trainables.eval()
        with torch.no_grad():
            m = evaluate()
        trainables.train()
        row = {"step": state["step"], "epoch": state["epoch"] + state["batch_in_epoch"] / max(1, steps_per_epoch),
               **{f"eval_{k}": v for k, v in m.items()}}
        log_row(row)
        state["history"].append(row)
        if state["step"] >= best_after_step and (state["best"] is None or m["accuracy"] > state["best"]["accuracy"]):
            state["best"] = dict(m, step=state["step"])
            if best_state is not None and main:
                tmp = work_dir / ".best.tmp"
                save_file({k: v.detach().cpu().contiguous() for k, v in best_state().items()}, str(tmp),
                          metadata={"step": str(state["step"])})
                os.replace(tmp, best_file)
        log.info("%s: step %d eval %s", desc, state["step"], " ".join(f"{k}={v:.4f}" for k, v in m.items()))

    t0 = time.time()
    last_save = [t0]
    trainables.train()
    bar = tqdm(total=total, initial=state["step"], desc=desc, unit="step", dynamic_ncols=True, disable=not main,
               mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
    try:
        while state["epoch"] < cfg.epochs:
            sampler.seek(state["epoch"], state["batch_in_epoch"])
            for batch in loader:
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
                with accelerator.autocast():
                    loss, logs = loss_fn(batch)
                accelerator.backward(loss)
                for h in hooks:
                    h.after_backward(state["step"] + 1)
                if cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainables.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                pending["sum"] += loss.detach().float()
                pending["n"] += 1
                pending["logs"] = logs  # the last step's loss terms and weights, read when the row is written
                state["step"] += 1
                state["batch_in_epoch"] += 1
                bar.update(1)
                if not cuda and nproc == 1 and not math.isfinite(loss.item()):
                    pending["first"] = state["step"]  # on one CPU a read costs nothing: name the very step
                    flush()
                if state["step"] % max(1, cfg.log_every) == 0:
                    flush()
                if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["batch_in_epoch"] < steps_per_epoch:
                    run_eval()
                for h in hooks:
                    h.after_step(state["step"])
                if checkpoint_due():
                    save_checkpoint()
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            run_eval()
            save_checkpoint()
    except KeyboardInterrupt:
        bar.close()
        if main and math.isfinite(float(pending["sum"])):
            ckpt.save(accelerator.unwrap_model(trainables), optimizer, scheduler, state)
        raise DpqError(f"{desc}: interrupted at step {state['step']}; checkpoint saved, run the same command again "
                       "to resume") from None
    finally:
        bar.close()
    devices.barrier()
    if restore_best is not None and best_file.is_file():
        restore_best(load_file(str(best_file)))
    seconds = time.time() - t0
    return TrainResult(best_metrics=state["best"] or {}, steps=state["step"], seconds=seconds, history=state["history"],
                       mixed_precision=precision)


def _best_step(path: Path) -> int | None:
    try:
        with safe_open(str(path), "pt") as f:
            return int((f.metadata() or {}).get("step", -1))
    except (OSError, ValueError, SafetensorError):
        return None
