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
from typing import Callable

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

from . import artifacts
from .data import EncodedSplit, make_loader
from .errors import DpqError

log = logging.getLogger("dpq")


@dataclass
class TrainConfig:
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_every: int = 0  # steps between evaluations; 0 = at the end of each epoch
    checkpoint_every: int = 100  # steps between resumable checkpoints
    log_every: int = 1  # steps between metrics.jsonl rows (loss, lr, every logged loss term and GoR weight)

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
    """Resumable state in ``work_dir/checkpoint``: written to a temp folder, then renamed."""

    def __init__(self, work_dir: Path, fingerprint: str):
        self.dir = work_dir / "checkpoint"
        self.fingerprint = fingerprint

    def save(self, trainables, optimizer, scheduler, state: dict) -> None:
        tmp = self.dir.parent / ".checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(trainables, str(tmp / "weights.safetensors"))
        opt = optimizer.state_dict()
        tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in opt["state"].items()
                   for k, v in s.items() if torch.is_tensor(v)}
        if tensors:
            save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        meta = dict(state, fingerprint=self.fingerprint, param_groups=opt["param_groups"],
                    scheduler=scheduler.state_dict(), python_rng=random.getstate())
        artifacts.write_json_atomic(tmp / "state.json", meta)
        old = self.dir.parent / ".checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            os.replace(self.dir, old)
        os.replace(tmp, self.dir)
        shutil.rmtree(old, ignore_errors=True)

    def load(self, trainables, optimizer, scheduler) -> dict | None:
        meta_path = self.dir / "state.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != self.fingerprint:
            log.info("checkpoint in %s was made with other settings; starting over", self.dir)
            return None
        missing, unexpected = load_model(trainables, str(self.dir / "weights.safetensors"), strict=True)
        opt_state: dict[int, dict] = {}
        if (self.dir / "optimizer.safetensors").is_file():
            for key, v in load_file(str(self.dir / "optimizer.safetensors")).items():
                i, k = key.split(".", 1)
                opt_state.setdefault(int(i), {})[k] = v
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
        scheduler.load_state_dict(meta["scheduler"])
        rng = load_file(str(self.dir / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
        pr = meta["python_rng"]
        random.setstate((pr[0], tuple(pr[1]), pr[2]))
        return meta


class _StopForTest(Exception):
    """Simulates a kill at a given step (no checkpoint written at that moment)."""


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
    stop_after_steps: int | None = None,
    desc: str = "train",
    after_backward: Callable[[int], None] | None = None,
    best_after_step: int = 0,
) -> TrainResult:
    """Train ``trainables`` (a module holding the model and any auxiliary trained modules).

    ``evaluate()`` returns metrics with an ``accuracy`` key; the best-scoring weights (``best_state()``)
    are kept in ``work_dir/best.safetensors`` and restored at the end through ``restore_best``; evaluations
    before ``best_after_step`` are logged but cannot be best (a pruning run is only final after its schedule).
    ``after_backward(step)`` sees the gradients of each step before the optimizer uses them.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    set_seed(cfg.seed)
    loader = make_loader(train_set, pad_ids, cfg.batch_size, shuffle=True, seed=cfg.seed)
    sampler = loader.batch_sampler
    steps_per_epoch = len(sampler)
    total = max(1, steps_per_epoch * cfg.epochs)
    optimizer = torch.optim.AdamW(_param_groups(trainables, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(total, int(cfg.warmup_ratio * total)))
    trainables, optimizer = accelerator.prepare(trainables, optimizer)

    ckpt = _Checkpoint(work_dir, fingerprint or artifacts.settings_hash(asdict(cfg)))
    metrics_log = work_dir / "metrics.jsonl"
    state = ckpt.load(trainables, optimizer, scheduler)
    if state is None:
        state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "history": []}
        metrics_log.unlink(missing_ok=True)
        (work_dir / "best.safetensors").unlink(missing_ok=True)
    else:
        log.info("%s: resuming from step %d (epoch %d, batch %d)", desc, state["step"], state["epoch"] + 1, state["batch_in_epoch"])

    def log_row(row: dict) -> None:
        with open(metrics_log, "a") as f:
            f.write(json.dumps(row) + "\n")

    def run_eval() -> None:
        if evaluate is None:
            return
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
            if best_state is not None:
                tmp = work_dir / ".best.tmp"
                save_file({k: v.detach().cpu().contiguous() for k, v in best_state().items()}, str(tmp))
                os.replace(tmp, work_dir / "best.safetensors")
        log.info("%s: step %d eval %s", desc, state["step"], " ".join(f"{k}={v:.4f}" for k, v in m.items()))

    t0 = time.time()
    trainables.train()
    bar = tqdm(total=total, initial=state["step"], desc=desc, unit="step", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
    try:
        while state["epoch"] < cfg.epochs:
            sampler.set_epoch(state["epoch"], state["batch_in_epoch"])
            for batch in loader:
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.autocast():
                    loss, logs = loss_fn(batch)
                if not torch.isfinite(loss):
                    raise DpqError(f"{desc}: loss became {loss.item()} at step {state['step'] + 1}; stopped without "
                                   f"saving a model (last good checkpoint kept in {ckpt.dir}); lower the learning rate")
                accelerator.backward(loss)
                if after_backward is not None:
                    after_backward(state["step"] + 1)
                if cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainables.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["batch_in_epoch"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                if state["step"] % cfg.log_every == 0:
                    log_row({"step": state["step"], "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                             **{k: float(v) for k, v in logs.items()}})
                if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["batch_in_epoch"] < steps_per_epoch:
                    run_eval()
                if stop_after_steps is not None and state["step"] >= stop_after_steps:
                    raise _StopForTest()
                if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                    ckpt.save(accelerator.unwrap_model(trainables), optimizer, scheduler, state)
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            run_eval()
            ckpt.save(accelerator.unwrap_model(trainables), optimizer, scheduler, state)
    except KeyboardInterrupt:
        bar.close()
        ckpt.save(accelerator.unwrap_model(trainables), optimizer, scheduler, state)
        raise DpqError(f"{desc}: interrupted at step {state['step']}; checkpoint saved, run the same command again to resume") from None
    finally:
        bar.close()
    if restore_best is not None and (work_dir / "best.safetensors").is_file():
        restore_best(load_file(str(work_dir / "best.safetensors")))
    seconds = time.time() - t0
    return TrainResult(best_metrics=state["best"] or {}, steps=state["step"], seconds=seconds, history=state["history"])
