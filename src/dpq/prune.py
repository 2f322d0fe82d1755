"""Structured pruning of attention heads and FFN neurons that really removes them.

Read it like torchao: a ``PruneConfig`` and transforms on an ordinary ``nn.Module``:

    masks = HeadFfnMasks.install(model)          # masks applied in the forward pass
    scores = importance(model, grads, cfg)       # magnitude, |W·dL_KD/dW|, or their normalised mix
    masks.update(scores, cfg, fraction)          # uniform or layer-adaptive allocation
    remove_masked(model, masks)                  # physical surgery: smaller Linear layers

The per-layer kept heads and FFN widths are written to the model config (``dpq_kept_heads``,
``dpq_ffn_sizes``), so ``dpq.load_model`` rebuilds the smaller shapes and loads the weights exactly.
A layer keeps at least one head and one FFN neuron: attention blocks are never dropped silently.
The architecture adapters and the surgery live in ``hf/modeling_dpq.py``, the file saved beside a pruned model: the
Hugging Face classes rebuild its shapes with the same code where dpq is not installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import transforms
from .errors import DpqError
from .hf import modeling_dpq as _hf
from .hf.modeling_dpq import Layer, restore_structure, shrink_layer

IMPORTANCE = ("magnitude", "kd-gradient", "combined")
ALLOCATION = ("uniform", "layer-adaptive")


@dataclass
class PruneConfig:
    heads: float = 0.0  # fraction of all attention heads to remove
    ffn: float = 0.0  # fraction of all FFN neurons to remove
    importance: str = "combined"
    allocation: str = "uniform"
    lambda_mag: float = 0.5
    lambda_grad: float = 0.5

    def __post_init__(self):
        for name in ("heads", "ffn"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise DpqError(f"prune.{name}: fraction must be in [0, 1) (got {v})")
        if self.importance not in IMPORTANCE:
            raise DpqError(f"prune.importance: one of {', '.join(IMPORTANCE)} (got {self.importance!r})")
        if self.allocation not in ALLOCATION:
            raise DpqError(f"prune.allocation: one of {', '.join(ALLOCATION)} (got {self.allocation!r})")


# ----------------------------------------------------------------------------- architecture adapters


def layers(model: nn.Module) -> list[Layer]:
    """The prunable parts of each encoder layer; a clear error for architectures dpq cannot prune."""
    try:
        return _hf.layers(model)
    except _hf.UnsupportedArchitecture as e:
        raise DpqError(str(e)) from None


# ----------------------------------------------------------------------------- masks


class HeadFfnMasks(nn.Module):
    """0/1 masks on each layer's heads (input of the output projection) and FFN neurons (input of ffn_out).

    The masks are buffers, so a training checkpoint carries them and a resumed run continues pruned.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.layers = layers(model)
        for i, l in enumerate(self.layers):
            self.register_buffer(f"head_{i}", torch.ones(l.n_heads, device=l.q.weight.device))
            self.register_buffer(f"ffn_{i}", torch.ones(l.ffn_size, device=l.q.weight.device))
        self._hooks = []

    @property
    def head(self) -> list[torch.Tensor]:
        return [getattr(self, f"head_{i}") for i in range(len(self.layers))]

    @property
    def ffn(self) -> list[torch.Tensor]:
        return [getattr(self, f"ffn_{i}") for i in range(len(self.layers))]

    @classmethod
    def install(cls, model: nn.Module) -> "HeadFfnMasks":
        m = cls(model)
        for i, l in enumerate(m.layers):
            m._hooks.append(l.o.register_forward_pre_hook(m._head_hook(i)))
            m._hooks.append(l.ffn_out.register_forward_pre_hook(m._ffn_hook(i)))
        return m

    def _head_hook(self, i):
        def hook(module, args):
            x = args[0]
            mask = getattr(self, f"head_{i}").to(x.device, x.dtype).repeat_interleave(self.layers[i].head_dim)
            return (x * mask,) + args[1:]
        return hook

    def _ffn_hook(self, i):
        def hook(module, args):
            return (args[0] * getattr(self, f"ffn_{i}").to(args[0].device, args[0].dtype),) + args[1:]
        return hook

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def fractions(self) -> tuple[float, float]:
        heads = sum(float(m.sum()) for m in self.head) / sum(m.numel() for m in self.head)
        ffn = sum(float(m.sum()) for m in self.ffn) / sum(m.numel() for m in self.ffn)
        return 1 - heads, 1 - ffn

    @torch.no_grad()
    def update(self, scores: dict, cfg: PruneConfig, progress: float = 1.0) -> None:
        """Mask the lowest-scored structures so that ``progress`` × the target fractions are removed.

        Already-masked structures stay masked (their score is -inf), so masks only ever grow.
        """
        for i, m in enumerate(_allocate(scores["heads"], self.head, cfg.heads * progress, cfg.allocation)):
            getattr(self, f"head_{i}").copy_(m)
        for i, m in enumerate(_allocate(scores["ffn"], self.ffn, cfg.ffn * progress, cfg.allocation)):
            getattr(self, f"ffn_{i}").copy_(m)


def _allocate(scores: list[torch.Tensor], masks: list[torch.Tensor], fraction: float,
              allocation: str) -> list[torch.Tensor]:
    # a few thousand numbers: ranked on the host whatever device the model trains on
    masks = [m.detach().cpu() for m in masks]
    scores = [torch.where(m > 0, s.detach().float().cpu(), torch.tensor(-math.inf, device="cpu"))
              for s, m in zip(scores, masks)]
    new = [torch.ones_like(m) for m in masks]
    if allocation == "uniform":
        for s, n in zip(scores, new):
            k = min(int(round(fraction * n.numel())), n.numel() - 1)
            if k > 0:
                n[torch.argsort(s)[:k]] = 0
    else:  # layer-adaptive: one global ranking, each layer keeps at least one
        total = sum(s.numel() for s in scores)
        k = int(round(fraction * total))
        flat = torch.cat(scores)
        owner = torch.cat([torch.full((s.numel(),), i, device="cpu") for i, s in enumerate(scores)])
        pos = torch.cat([torch.arange(s.numel(), device="cpu") for s in scores])
        kept = [s.numel() for s in scores]
        removed = 0
        for j in torch.argsort(flat).tolist():
            if removed >= k:
                break
            i = int(owner[j])
            if kept[i] <= 1:
                continue
            new[i][pos[j]] = 0
            kept[i] -= 1
            removed += 1
    return [n * (m > 0).float() for n, m in zip(new, masks)]


# ----------------------------------------------------------------------------- importance


def _head_blocks(l: Layer, w_q, w_k, w_v, w_o) -> torch.Tensor:
    """Per-head sums of a per-weight quantity over Q/K/V rows and O columns."""
    d, h = l.head_dim, l.n_heads
    rows = sum(t.reshape(h, d, -1).sum((1, 2)) for t in (w_q, w_k, w_v))
    cols = w_o.reshape(w_o.shape[0], h, d).sum((0, 2))
    return rows + cols


def magnitude_scores(model: nn.Module) -> dict:
    """L2 norm of each head's Q/K/V rows and O columns, and of each neuron's input row and output column."""
    heads, ffn = [], []
    for l in layers(model):
        sq = [m.weight.detach().float() ** 2 for m in (l.q, l.k, l.v, l.o)]
        heads.append(_head_blocks(l, *sq).sqrt().cpu())
        ffn.append((l.ffn_in.weight.detach().float() ** 2).sum(1)
                   .add((l.ffn_out.weight.detach().float() ** 2).sum(0)).sqrt().cpu())
    return {"heads": heads, "ffn": ffn}


class GradientSensitivity(nn.Module):
    """Accumulates |W ⊙ ∂L/∂W| per head and FFN neuron over the steps it is called on (after backward).

    Accumulators are buffers so that a resumed run continues the same importance window.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.layers = layers(model)
        for i, l in enumerate(self.layers):
            self.register_buffer(f"head_{i}", torch.zeros(l.n_heads, device=l.q.weight.device))
            self.register_buffer(f"ffn_{i}", torch.zeros(l.ffn_size, device=l.q.weight.device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=self.layers[0].q.weight.device))

    @torch.no_grad()
    def reset(self) -> None:
        for b in self.buffers():
            b.zero_()

    @torch.no_grad()
    def accumulate(self) -> None:
        for i, l in enumerate(self.layers):
            if l.q.weight.grad is None:
                return
            prods = [(m.weight * m.weight.grad).abs().float() for m in (l.q, l.k, l.v, l.o)]
            getattr(self, f"head_{i}").add_(_head_blocks(l, *prods).to(self.steps.device))
            f = ((l.ffn_in.weight * l.ffn_in.weight.grad).abs().float().sum(1)
                 + (l.ffn_out.weight * l.ffn_out.weight.grad).abs().float().sum(0))
            getattr(self, f"ffn_{i}").add_(f.to(self.steps.device))
        self.steps += 1

    def scores(self) -> dict | None:
        if int(self.steps) == 0:
            return None
        n = len(self.layers)
        return {"heads": [getattr(self, f"head_{i}").clone().cpu() for i in range(n)],
                "ffn": [getattr(self, f"ffn_{i}").clone().cpu() for i in range(n)]}


def _normalised(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    total = torch.cat(xs).sum().clamp_min(1e-12)
    n = sum(x.numel() for x in xs)
    return [x * n / total for x in xs]  # mean 1 over the model, so the two criteria weigh alike


def importance(model: nn.Module, grads: dict | None, cfg: PruneConfig) -> dict:
    if cfg.importance == "magnitude" or grads is None:
        if cfg.importance != "magnitude" and grads is None:
            raise DpqError("kd-gradient importance needs gradients accumulated over a window of training steps")
        return magnitude_scores(model)
    if cfg.importance == "kd-gradient":
        return grads
    mag = magnitude_scores(model)
    out = {}
    for key in ("heads", "ffn"):
        out[key] = [cfg.lambda_mag * a + cfg.lambda_grad * b
                    for a, b in zip(_normalised(mag[key]), _normalised(grads[key]))]
    return out


def cubic_fraction(step: int, start: int, end: int) -> float:
    """Share of the final sparsity reached at ``step`` (Zhu & Gupta, 2017): 1 - (1 - t)^3 between start and end."""
    if step < start:
        return 0.0
    if step >= end or end <= start:
        return 1.0
    t = (step - start) / (end - start)
    return 1.0 - (1.0 - t) ** 3


class PruneSchedule:
    """The training loop's hook for gradual pruning: accumulates gradient sensitivity every step and grows the
    masks on the cubic schedule every ``update_every`` steps from ``start`` to ``end`` (1-based steps). Masks and
    the importance window are buffers of modules the stage trains, so a resumed run continues the same schedule."""

    def __init__(self, model: nn.Module, masks: HeadFfnMasks, sens: GradientSensitivity, cfg: PruneConfig,
                 start: int, end: int, update_every: int):
        self.model, self.masks, self.sens, self.cfg = model, masks, sens, cfg
        self.start, self.end, self.update_every = start, end, update_every

    def after_backward(self, step: int) -> None:
        if self.cfg.importance != "magnitude":
            self.sens.accumulate()
        due = step >= self.start and ((step - self.start) % self.update_every == 0 or step == self.end)
        if due and step <= self.end:
            self.masks.update(importance(self.model, self.sens.scores(), self.cfg), self.cfg,
                              cubic_fraction(step, self.start, self.end))
            self.sens.reset()

    def after_step(self, step: int) -> None:
        pass


# ----------------------------------------------------------------------------- surgery


def remove_masked(model: nn.Module, masks: HeadFfnMasks) -> dict:
    """Physically remove masked heads and neurons; record the per-layer structure in the config."""
    masks.remove_hooks()
    ls = layers(model)
    prev = getattr(model.config, "dpq_kept_heads", None) or [list(range(l.n_heads)) for l in ls]
    kept_heads, ffn_sizes = [], []
    for l, hm, fm, before in zip(ls, masks.head, masks.ffn, prev):
        kh = torch.nonzero(hm > 0).flatten()
        kf = torch.nonzero(fm > 0).flatten()
        shrink_layer(l, kh, kf)
        kept_heads.append([before[i] for i in kh.tolist()])  # indices into the original, unpruned heads
        ffn_sizes.append(len(kf))
    model.config.dpq_kept_heads = kept_heads
    model.config.dpq_ffn_sizes = ffn_sizes
    transforms.record(model.config, "prune")
    _hf.install_bias_selectors(model, kept_heads)
    return {"kept_heads": kept_heads, "ffn_sizes": ffn_sizes}


transforms.register(transforms.Rebuild("prune", 1, "dpq_kept_heads", shape=restore_structure, module=__name__))
