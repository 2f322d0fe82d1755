"""Knowledge-distillation losses (a model transform's loss side; the stage that runs it is in stages.py).

    L = (1-α)·CE(y, p_S) + α·T²·KL(p_T^T || p_S^T) + β_h·hidden-MSE + β_a·attention-KL

Hidden states of different widths are compared through learned linear projections (student → teacher),
one per mapped layer; attention maps are compared head by head where the head counts match.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DpqError


@dataclass
class KDConfig:
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft-label term; 1-alpha goes to cross-entropy with the true labels
    hidden_weight: float = 0.0
    attention_weight: float = 0.0
    # teacher layer (1-based) matched to each student layer 1..L_s; None = evenly spaced (e.g. 2,4,..,12 for 12 → 6)
    layer_map: list[int] | None = field(default=None)

    def __post_init__(self):
        if self.temperature <= 0:
            raise DpqError(f"temperature must be > 0 (got {self.temperature})")
        if not 0.0 <= self.alpha <= 1.0:
            raise DpqError(f"alpha must be in [0, 1] (got {self.alpha})")
        if self.hidden_weight < 0 or self.attention_weight < 0:
            raise DpqError("hidden_weight and attention_weight must be >= 0")

    @property
    def needs_teacher_forward(self) -> bool:
        return self.hidden_weight > 0 or self.attention_weight > 0


def _pieces(tokenizer, texts: list[str]) -> list[list[str]]:
    """Each text as the token strings the model reads, with every special token (CLS or <s>, SEP or </s>, UNK) named
    by its role: two tokenizers that number one vocabulary differently, or spell their markers differently (MiniLM
    and MPNet), still give the same pieces at the same positions."""
    roles = {"cls": "<cls>", "bos": "<cls>", "sep": "<sep>", "eos": "<sep>", "unk": "<unk>"}
    by_id = {i: name for r, name in roles.items() if (i := getattr(tokenizer, f"{r}_token_id", None)) is not None}
    return [[by_id.get(i, piece) for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids))]
            for ids in tokenizer(texts)["input_ids"]]


def check_same_tokens(cfg: KDConfig, student_tokenizer, teacher_tokenizer, texts) -> None:
    """Hidden-state and attention KD compare the two models position by position, which means something only when
    both read a sentence as the same pieces in the same places. Checked on a sample of the training sentences, by
    the pieces themselves: neither the files' paths nor the ids' numbering matter."""
    if not cfg.needs_teacher_forward:
        return
    sample = [t for t in itertools.islice(texts, 256) if isinstance(t, str)]
    s_pieces, t_pieces = _pieces(student_tokenizer, sample), _pieces(teacher_tokenizer, sample)
    for text, s, t in zip(sample, s_pieces, t_pieces):
        if s != t:
            at = next((i for i, (a, b) in enumerate(zip(s, t)) if a != b), min(len(s), len(t)))
            said = text if len(text) <= 60 else text[:57] + "..."
            raise DpqError(f"hidden-state and attention distillation compare token positions, but the student's and "
                           f"the teacher's tokenizers split the training sentences differently (\"{said}\": token "
                           f"{at} is {(s[at:at + 1] or ['nothing'])[0]!r} for the student, "
                           f"{(t[at:at + 1] or ['nothing'])[0]!r} for the teacher); set hidden_weight and "
                           "attention_weight to 0 (logit distillation works across tokenizers)")


def soft_label_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch (Hinton et al., 2015)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t


def default_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    return [round((i + 1) * teacher_layers / student_layers) for i in range(student_layers)]


def _common_mask(s_mask: torch.Tensor, t_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Positions both tokenizations fill; same-vocabulary tokenizers line up token for token."""
    width = min(s_mask.shape[1], t_mask.shape[1])
    return (s_mask[:, :width] * t_mask[:, :width]).float(), width


def hidden_mse(s_hidden, t_hidden, projections, layer_map, s_mask, t_mask) -> torch.Tensor:
    mask, w = _common_mask(s_mask, t_mask)
    total = s_hidden[0].new_zeros((), dtype=torch.float32)
    denom = mask.sum().clamp_min(1.0)
    for i, (proj, j) in enumerate(zip(projections, layer_map)):
        s = proj(s_hidden[i + 1][:, :w].float())  # hidden_states[0] is the embedding output
        t = t_hidden[j][:, :w].float()
        total = total + (((s - t) ** 2).mean(-1) * mask).sum() / denom
    return total / len(layer_map)


def attention_kl(s_attn, t_attn, layer_map, s_mask, t_mask) -> torch.Tensor:
    """KL(teacher ‖ student) between attention distributions of matched layers, over real query rows."""
    mask, w = _common_mask(s_mask, t_mask)
    total = s_attn[0].new_zeros((), dtype=torch.float32)
    rows = mask.sum().clamp_min(1.0) * s_attn[0].shape[1]
    for i, j in enumerate(layer_map):
        s = s_attn[i][:, :, :w, :w].float()
        t = t_attn[j - 1][:, :, :w, :w].float()
        # renormalise over the common key positions; clamp keeps log finite where a probability underflows
        s = s / s.sum(-1, keepdim=True).clamp_min(1e-12)
        t = t / t.sum(-1, keepdim=True).clamp_min(1e-12)
        kl = (t * (t.clamp_min(1e-12).log() - s.clamp_min(1e-12).log())).sum(-1)  # B,H,Lq
        total = total + (kl * mask[:, None, :]).sum() / rows
    return total / len(layer_map)


class FixedWeighting(nn.Module):
    """Convex mix of the task and KD losses with a fixed α; the interface learnable weightings implement too.

    ``kd`` is one KD term (a scalar) or one per teacher (a vector): several share α equally. With equal weights the
    student's gradient is that of distilling from the mean of the teachers' distributions, since
    Σ_i KL(p_i ‖ q) = n·KL(p̄ ‖ q) + a constant in q.
    """

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = alpha

    def forward(self, task: torch.Tensor, kd: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return (1 - self.alpha) * task + self.alpha * kd.mean(), {}

    def summary(self) -> dict:
        return {}


class GoRWeighting(nn.Module):
    """Game of Regularizer (GoR; Rehman et al., arXiv 2509.20854): two trainable scalars balance the task
    loss and the KD loss, learned jointly with the student.

    dpq's reading of the paper's abstract, not a transcription: only its abstract could be read (the stored
    copy of arXiv 2509.20854v1 stops before the method section, so its equation cannot be cited here). The
    abstract fixes two trainable parameters that weight the task and KD losses dynamically, because their
    gradient magnitudes differ under low-bit QAT. The form used is learned log-variance weighting
    (Kendall, Gal & Cipolla, CVPR 2018, eq. 7):

        L = exp(-s_task)·L_task + exp(-s_kd)·L_kd + s_task + s_kd,    s_task = s_kd = 0 at the start

    so the weights exp(-s) start at 1 and stay positive, and the +s terms stop both from collapsing to 0;
    at the optimum each weight is 1/L of its loss, which evens out the two gradient magnitudes. Each s is
    clamped to [-s_max, s_max] (weights within e^±s_max) so one term can never switch the other off. The
    scalars are excluded from weight decay and train at their own learning rate ``lr`` (under the same
    warm-up/decay schedule): at a fine-tuning rate such as 5e-5 they would move by ~0.01 in a 250-step run.
    Any module with this ``forward`` can replace it.

    Several teachers with a KD term each (``kd_terms`` > 1, EKD with ``teacher_combine: per-teacher``): one s per
    term, ``Σ_i exp(-s_i)·L_kd,i + s_i`` — Kendall et al.'s form for any number of losses, so each teacher's weight
    settles at 1/its loss. That is 1 + n learned scalars, dpq's generalisation and not the paper's two: the paper's
    EKD-GoR method is not readable here. One KD term (one teacher, or ``average``) is the two-scalar form exactly.
    """

    def __init__(self, s_max: float = 5.0, lr: float = 1e-2, kd_terms: int = 1):
        super().__init__()
        self.s_task = nn.Parameter(torch.zeros(()))
        self.s_kd = nn.Parameter(torch.zeros(() if kd_terms == 1 else (kd_terms,)))  # one term: as checkpoints hold it
        for p in (self.s_task, self.s_kd):
            p._dpq_no_decay = True
            p._dpq_lr = lr
        self.s_max = s_max

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.exp(-self.s_task.clamp(-self.s_max, self.s_max)),
                torch.exp(-self.s_kd.clamp(-self.s_max, self.s_max)))

    def forward(self, task: torch.Tensor, kd: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if kd.shape != self.s_kd.shape:
            raise DpqError(f"GoR weighting made for {self.s_kd.numel()} KD term(s) got {kd.numel()}")
        st, sk = self.s_task.clamp(-self.s_max, self.s_max), self.s_kd.clamp(-self.s_max, self.s_max)
        total = torch.exp(-st) * task + (torch.exp(-sk) * kd).sum() + st + sk.sum()
        return total, {"gor_w_task": torch.exp(-st).detach(), **_kd_weights(torch.exp(-sk).detach())}

    def summary(self) -> dict:
        """The learned weights as plain numbers (one KD weight, or a list of one per teacher)."""
        wt, wk = (w.detach().cpu() for w in self.weights())
        return {"gor_w_task": float(wt), "gor_w_kd": float(wk) if wk.ndim == 0 else wk.tolist()}


def _kd_weights(w: torch.Tensor) -> dict:
    """metrics.jsonl columns: ``gor_w_kd`` for one KD term, ``gor_w_kd0``… (the main teacher first) for several."""
    return {"gor_w_kd": w} if w.ndim == 0 else {f"gor_w_kd{i}": x for i, x in enumerate(w)}


def make_weighting(kind: str, alpha: float, kd_terms: int = 1) -> nn.Module:
    if kind == "fixed":
        return FixedWeighting(alpha)
    if kind == "gor":
        return GoRWeighting(kd_terms=kd_terms)
    raise DpqError(f"loss_weights must be fixed or gor (got {kind!r})")


def ensemble_logits(logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Logits whose temperature-softened distribution is the mean of the teachers' softened distributions.

    T·log(mean_i softmax(z_i/T)): plugging these into ``soft_label_kd`` distils from the averaged
    ensemble (EKD) without any change to the KD loss.
    """
    t = temperature
    probs = torch.stack([torch.softmax(z.float() / t, dim=-1) for z in logits]).mean(0)
    return t * probs.clamp_min(1e-30).log()


class KDLoss(nn.Module):
    """All distillation terms for one student/teacher pair; owns the trained projections."""

    def __init__(self, cfg: KDConfig, student_config, teacher_config, weighting: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        ls, lt = student_config.num_hidden_layers, teacher_config.num_hidden_layers
        self.layer_map = list(cfg.layer_map) if cfg.layer_map else default_layer_map(ls, lt)
        if cfg.needs_teacher_forward:
            if len(self.layer_map) != ls:
                raise DpqError(f"layer_map has {len(self.layer_map)} entries; the student has {ls} layers")
            if any(not 1 <= j <= lt for j in self.layer_map):
                raise DpqError(f"layer_map entries must be teacher layers 1..{lt} (got {self.layer_map})")
        if cfg.attention_weight > 0 and student_config.num_attention_heads != teacher_config.num_attention_heads:
            raise DpqError(f"attention KD needs equal head counts (student {student_config.num_attention_heads}, "
                           f"teacher {teacher_config.num_attention_heads}); set attention_weight to 0")
        hs, ht = student_config.hidden_size, teacher_config.hidden_size
        n = ls if cfg.hidden_weight > 0 else 0
        self.projections = nn.ModuleList(nn.Linear(hs, ht) if hs != ht else nn.Identity() for _ in range(n))
        self.weighting = weighting if weighting is not None else FixedWeighting(cfg.alpha)

    def forward(self, s_out, labels, teacher_logits, t_out=None, s_mask=None, t_mask=None) -> tuple[torch.Tensor, dict]:
        """``teacher_logits``: one target, or a list of targets (one KD term per teacher, given to the weighting
        as a vector). ``t_out``: the main teacher's outputs, for hidden-state and attention KD."""
        task = F.cross_entropy(s_out.logits.float(), labels)
        if isinstance(teacher_logits, (list, tuple)):
            kd = torch.stack([soft_label_kd(s_out.logits, t, self.cfg.temperature) for t in teacher_logits])
        else:
            kd = soft_label_kd(s_out.logits, teacher_logits, self.cfg.temperature)
        total, logs = self.weighting(task, kd)
        logs = dict(logs, ce=task.detach(), kd=kd.detach().mean())
        if kd.ndim:
            logs.update({f"kd{i}": k for i, k in enumerate(kd.detach())})
        if self.cfg.hidden_weight > 0:
            h = hidden_mse(s_out.hidden_states, t_out.hidden_states, self.projections, self.layer_map, s_mask, t_mask)
            total = total + self.cfg.hidden_weight * h
            logs["hidden"] = h.detach()
        if self.cfg.attention_weight > 0:
            a = attention_kl(s_out.attentions, t_out.attentions, self.layer_map, s_mask, t_mask)
            total = total + self.cfg.attention_weight * a
            logs["attention"] = a.detach()
        return total, logs
