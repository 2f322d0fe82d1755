"""Training throughput of dpq's loop per kind of stage, on whatever device this machine has.

    python benchmarks/train_throughput.py --data ../shared/data/sst2 [--device auto|cpu|cuda] [--steps 300]
        [--batch-size 32] [--stages teacher baseline distill-hidden]

Each stage trains its real model (teacher all-mpnet-base-v2; student all-MiniLM-L6-v2, without KD and with
hidden-state KD, which runs a teacher forward every step) on the first ``steps × batch`` SST-2 training sentences
through ``dpq.train.train`` with the stage's own loss, in a scratch folder. The first ``warmup`` steps are not
timed (CUDA context, allocator, kernel autotuning). Prints steps/s and samples/s per stage with the device and
thread count; the GPU table in BENCHMARKS.md (issue 11) comes from this script.

``--mixed-precision no bf16`` and ``--adamw fused per-tensor`` time every stage under each combination, in turn in one
process (the loop's defaults: ``auto`` and fused; ``per-tensor`` is PyTorch's for-loop AdamW, the CPU default before):

    python benchmarks/train_throughput.py --data ../shared/data/sst2 --steps 60 --warmup 10 \
        --stages teacher baseline --mixed-precision no bf16 --adamw per-tensor fused

``--ops N`` also counts, over N steps after the timed ones, the PyTorch operators one step of the loop dispatches
(torch.profiler, CPU activity): top-level calls, and the innermost ones (on a GPU most of these launch a kernel;
views launch none). An eager step pays the host's dispatch and launch cost once per operator whatever the batch
size, so this count bounds how many steps per second a host can issue.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from dpq import devices, measure, models
from dpq.data import encode_split, load_data, pad_ids
from dpq.distill import KDConfig, KDLoss
from dpq.train import Hook, TrainConfig, train

TEACHER = "sentence-transformers/all-mpnet-base-v2"
STUDENT = "sentence-transformers/all-MiniLM-L6-v2"


def _stage(name: str, data, n: int):
    """(trainables, loss_fn, train_set, pads) of one stage kind."""
    if name in ("teacher", "baseline"):
        model, tok = models.load_classifier(TEACHER if name == "teacher" else STUDENT, label_names=data.label_names)
        ds = encode_split(data.split("train").subset(n, 0), tok, 128)

        def loss_fn(batch):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return nn.functional.cross_entropy(logits.float(), batch["labels"]), {}

        return model, loss_fn, ds, pad_ids(tok)
    teacher, t_tok = models.load_classifier(TEACHER, label_names=data.label_names)
    teacher.eval().requires_grad_(False).to(devices.device())
    student, s_tok = models.load_classifier(STUDENT, label_names=data.label_names)
    kd = KDLoss(KDConfig(hidden_weight=1.0), student.config, teacher.config)
    ds = encode_split(data.split("train").subset(n, 0), s_tok, 128, teacher_tokenizer=t_tok)

    def loss_fn(batch):
        s_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        with torch.no_grad():
            t_out = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                            output_hidden_states=True)
        return kd(s_out, batch["labels"], t_out.logits, t_out, batch["attention_mask"], batch["teacher_attention_mask"])

    return nn.ModuleDict({"student": student, "kd": kd}), loss_fn, ds, pad_ids(s_tok, t_tok)


def operators(prof, steps: int) -> tuple[float, float]:
    """(top-level, innermost) aten operators per step: calls no other aten call encloses, and calls that make none."""
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    top = sum(1 for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    leaf = sum(1 for e in aten if not any(c.name.startswith("aten::") for c in e.cpu_children))
    return top / steps, leaf / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--device", default="auto", choices=devices.CHOICES)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--stages", nargs="+", default=["teacher", "baseline", "distill-hidden"])
    ap.add_argument("--ops", type=int, default=0, help="count the operators of N steps after the timed ones")
    ap.add_argument("--mixed-precision", nargs="+", default=["auto"], choices=("auto", "no", "bf16"))
    ap.add_argument("--adamw", nargs="+", default=["fused"], choices=("fused", "per-tensor"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
    devices.set_choice(args.device)
    data = load_data(args.data)
    dev = devices.device()
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{where}; batch {args.batch_size}; {args.steps} steps timed after {args.warmup}\n")
    ops_cols = " operators per step (top-level / innermost) |" if args.ops else ""
    print("| stage | mixed precision | AdamW | steps/s | samples/s | seconds |" + ops_cols)
    print("| --- | --- | --- | ---: | ---: | ---: |" + (" ---: |" if args.ops else ""))
    adamw = torch.optim.AdamW

    def per_tensor(*a, **kw):  # the loop asks for fused=True; not asking is PyTorch's per-tensor loop on a CPU
        return adamw(*a, **dict(kw, fused=None))

    for name, precision, opt in itertools.product(args.stages, args.mixed_precision, args.adamw):
        torch.optim.AdamW = adamw if opt == "fused" else per_tensor
        trainables, loss_fn, ds, pads = _stage(name, data, (args.steps + args.warmup + args.ops) * args.batch_size)
        marks = {}
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if args.ops else None

        class Clock(Hook):
            def after_step(self, step: int) -> None:
                if step in (args.warmup, args.warmup + args.steps):
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    marks[step] = time.perf_counter()
                # counted after the timed steps, so the profiler's own cost never enters the timing
                if prof is not None and step == args.warmup + args.steps:
                    prof.start()
                if prof is not None and step == args.warmup + args.steps + args.ops:
                    prof.stop()

        with tempfile.TemporaryDirectory() as work:
            cfg = TrainConfig(epochs=1, lr=2e-5, batch_size=args.batch_size, checkpoint_every=10**9,
                              checkpoint_minutes=10**6, log_every=50, mixed_precision=precision)
            result = train(trainables, loss_fn, ds, pads, cfg, Path(work), hooks=[Clock()], desc=name)
        secs = marks[args.warmup + args.steps] - marks[args.warmup]
        ops = " {:.0f} / {:.0f} |".format(*operators(prof, args.ops)) if prof is not None else ""
        print(f"| {name} | {result.mixed_precision} | {opt} "
              f"| {args.steps / secs:.1f} | {args.steps * args.batch_size / secs:.0f} | {secs:.1f} |{ops}",
              flush=True)
        del trainables
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    torch.optim.AdamW = adamw
    print(f"\n{measure.hardware()}")


if __name__ == "__main__":
    main()
