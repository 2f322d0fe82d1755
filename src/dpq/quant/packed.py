"""The packed quantized checkpoint: ``model.quant.safetensors`` beside an ordinary ``config.json``.

For each quantized weight ``N``: ``N.qcodes`` (uint8; two 4-bit codes per byte for int4), ``N.scales``
(float32, one per group) and, for asymmetric grids, ``N.zeros`` (uint8, packed like the codes). Every other
tensor (biases, norms, the classification head) is stored as is. ``config.json`` carries a ``dpq_quant``
section (method, bits, group size, and each quantized tensor's shape), so the file reloads into an
ordinary PyTorch model whose weights are the dequantized values — bit-exactly the grid that was trained
or calibrated, and the same grid the ONNX int4 export stores.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import transforms
from ..errors import DpqError
from .fake import QTensor, has_fp16_scales, pack_int4, unpack_int4

FILE = "model.quant.safetensors"
BITS = (4, 8)


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _tensor_problem(name: str, info) -> str | None:
    if not isinstance(info, dict):
        return f"tensors.{name} is a {type(info).__name__}, not a mapping"
    shape = info.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(map(_positive_int, shape))):
        return f"tensors.{name}.shape is {shape!r}, not [rows, columns]"
    if info.get("bits") not in BITS:
        return f"tensors.{name}.bits is {info.get('bits')!r}, not 4 or 8"
    if not _positive_int(info.get("group_size")):
        return f"tensors.{name}.group_size is {info.get('group_size')!r}, not a positive integer"
    return None


def section_problem(quant) -> str | None:
    """What is wrong with a ``dpq_quant`` section (None: nothing): the fields the loaders and exports read."""
    if not isinstance(quant, dict):
        return f"is a {type(quant).__name__}, not a mapping"
    if "bits" in quant and quant["bits"] not in BITS:  # the stages write it; a hand-made section may leave it out
        return f"bits is {quant['bits']!r}, not 4 or 8"
    if "group_size" in quant and not _positive_int(quant["group_size"]):
        return f"group_size is {quant['group_size']!r}, not a positive integer"
    tensors = quant.get("tensors")
    if not isinstance(tensors, dict):
        return f"tensors is {type(tensors).__name__}, not a mapping of quantized tensors"
    return next((p for name, info in tensors.items() if (p := _tensor_problem(name, info))), None)


def check_section(config, where) -> None:
    """Refuse in one line a config whose ``dpq_quant`` does not say what its packed file holds, before any loader
    indexes into it."""
    quant = getattr(config, "dpq_quant", None)
    if quant is None:
        return
    problem = section_problem(quant)
    if problem:
        raise DpqError(f"{where}: dpq_quant {problem}; the config is damaged or was edited by hand")


def _pack(t: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_int4(t) if bits == 4 else t.to(torch.uint8)


def _unpack(t: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return unpack_int4(t, n) if bits == 4 else t


def save_packed(model: torch.nn.Module, qweights: dict[str, QTensor], folder: Path, meta: dict) -> dict:
    """Write ``FILE`` into ``folder`` and return the ``dpq_quant`` config section to store in config.json."""
    tensors: dict[str, torch.Tensor] = {}
    shapes, symmetric = {}, True
    for name, q in qweights.items():
        tensors[f"{name}.qcodes"] = _pack(q.codes.cpu(), q.bits).contiguous()
        # fp16 when exact (every dpq quantizer rounds its scales to fp16: fake.fp16_grid); loads back to the same fp32
        tensors[f"{name}.scales"] = (q.scales.half() if has_fp16_scales(q) else q.scales.float()).cpu().contiguous()
        half = 2 ** (q.bits - 1)
        if not bool((q.zeros == half).all()):
            tensors[f"{name}.zeros"] = _pack(q.zeros.cpu(), q.bits).contiguous()
            symmetric = False
        shapes[name] = {"shape": list(q.shape), "bits": q.bits, "group_size": q.group_size}
    for name, t in model.state_dict().items():
        if name not in qweights:
            tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, str(Path(folder) / FILE), metadata={"format": "dpq-packed", "version": "1"})
    return dict(meta, symmetric=symmetric, tensors=shapes)


def load_qtensors(folder: Path, quant_cfg: dict) -> tuple[dict[str, QTensor], dict[str, torch.Tensor]]:
    """(quantized weights, every other tensor) from ``FILE``; refuses a file that does not match its config."""
    path = Path(folder) / FILE
    if problem := section_problem(quant_cfg):
        raise DpqError(f"{Path(folder) / 'config.json'}: dpq_quant {problem}; the config is damaged or was edited")
    try:
        raw = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
        raise DpqError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    q: dict[str, QTensor] = {}
    for name, info in quant_cfg.get("tensors", {}).items():
        rows, cols = info["shape"]
        bits, g = info["bits"], info["group_size"]
        groups = -(-cols // g)
        try:
            codes = _unpack(raw.pop(f"{name}.qcodes"), bits, cols)
            scales = raw.pop(f"{name}.scales")
            zeros = raw.pop(f"{name}.zeros", None)
        except KeyError as e:
            raise DpqError(f"{path}: missing {e.args[0]} (file does not match its config.json)") from None
        zeros = (torch.full((rows, groups), 2 ** (bits - 1), dtype=torch.uint8) if zeros is None
                 else _unpack(zeros, bits, groups))
        if tuple(codes.shape) != (rows, cols) or tuple(scales.shape) != (rows, groups):
            raise DpqError(f"{path}: {name} has shape {tuple(codes.shape)}, config.json says {(rows, cols)}")
        q[name] = QTensor(codes, scales.float(), zeros, bits, g)
    return q, raw


def dequantized_state(folder: Path, quant_cfg: dict) -> dict[str, torch.Tensor]:
    q, rest = load_qtensors(folder, quant_cfg)
    return dict(rest, **{k: v.dequantize() for k, v in q.items()})


transforms.register(transforms.Rebuild("quant-packed", 1, "dpq_quant",
                                        weights=lambda folder, config: dequantized_state(folder, config.dpq_quant),
                                        module=__name__))
