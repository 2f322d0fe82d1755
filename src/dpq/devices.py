"""Where dpq computes, and which process writes.

One process-wide choice: ``auto`` (CUDA when torch sees a GPU), ``cpu`` or ``cuda``, set by ``--device`` or the
recipe's ``device:``. It is not part of any stage's settings hash: a stage trained on a GPU is the same stage.

Under ``accelerate launch`` or ``torchrun`` (``WORLD_SIZE`` > 1) Accelerate's ``PartialState`` says which process
this is. Every process trains on its shard of each batch; only the main process writes files, logs, and takes
locks, and the others wait for it at ``barrier()`` before they read what it wrote.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from .errors import DpqError
from .recipe import PRECISIONS

CHOICES = ("auto", "cpu", "cuda")
CPUINFO = Path("/proc/cpuinfo")
_choice = "auto"


def set_choice(name: str) -> None:
    global _choice
    if name not in CHOICES:
        raise DpqError(f"device must be one of {', '.join(CHOICES)} (got {name!r})")
    if name == "cuda" and not torch.cuda.is_available():
        raise DpqError("device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False; a CPU build of "
                       f"torch {torch.__version__}?); use --device cpu or auto")
    _choice = name


def choice() -> str:
    return _choice


def use_cuda() -> bool:
    return _choice == "cuda" or (_choice == "auto" and torch.cuda.is_available())


def distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _state():
    from accelerate import PartialState

    return PartialState(cpu=not use_cuda())


def device() -> torch.device:
    """The device this process trains and evaluates on."""
    if distributed():
        return _state().device
    return torch.device("cuda") if use_cuda() else torch.device("cpu")


def num_processes() -> int:
    return _state().num_processes if distributed() else 1


def process_index() -> int:
    return _state().process_index if distributed() else 0


def is_main() -> bool:
    return not distributed() or _state().is_main_process


def barrier() -> None:
    if distributed():
        _state().wait_for_everyone()


def quiet_other_processes() -> None:
    """One log and one progress bar per job, from the main process."""
    if not is_main():
        logging.getLogger("dpq").setLevel(logging.ERROR)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in /proc/cpuinfo (Linux). Without them oneDNN emulates bf16 matmuls, slower than fp32."""
    try:
        return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", CPUINFO.read_text()))
    except OSError:
        return False


def mixed_precision(setting: str) -> str:
    """Accelerate's ``mixed_precision`` for a training run: ``bf16`` or ``no``."""
    if setting not in PRECISIONS:
        raise DpqError(f"mixed_precision must be auto, no or bf16 (got {setting!r})")
    if setting == "auto":
        return "bf16" if use_cuda() or cpu_has_native_bf16() else "no"
    return setting
