"""Which token the classifier reads: any dpq command, with the masked mean of the last hidden states in place of the
first token for the models whose id contains MATCH.

Both models are sentence-transformers checkpoints, trained with mean pooling; their heads read the first token
(BERT's pooler, MPNet's classification head). Reading the mean instead is the head they were trained for. The
BENCHMARKS issue-13 table "Mean pooling" was measured with it:

    PYTHONPATH=src python benchmarks/mean_pooling.py all-mpnet teacher \\
        --model sentence-transformers/all-mpnet-base-v2 --out T --data ../shared/data/sst2 --max-train-samples 3000 \\
        --epochs 1 --lr 3e-5 --seed 42
    PYTHONPATH=src python benchmarks/mean_pooling.py all-MiniLM distill --teacher runs/sst2-fast/teacher --out D \\
        --data ../shared/data/sst2 --max-train-samples 16000 --epochs 1 --teacher-logits onnx-int8 --seed 42

The saved folders load as ordinary first-token models, so only the stage's own figures (measured in this process)
mean anything: the experiment is not a dpq feature.
"""

from __future__ import annotations

import sys

import torch

from dpq import models
from dpq.cli import main


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-6)


def read_mean(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model``'s head read the masked mean of the sequence (BERT and MPNet classifiers), in place."""
    seen = {}

    def keep_mask(module, args, kwargs):
        seen["mask"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    model.register_forward_pre_hook(keep_mask, with_kwargs=True)
    base = model.config.model_type.removeprefix("dpq-")
    if base == "mpnet":
        head = model.classifier

        def head_forward(features, **kwargs):
            x = torch.tanh(head.dense(head.dropout(masked_mean(features, seen["mask"]))))
            return head.out_proj(head.dropout(x))

        head.forward = head_forward
    elif base == "bert":
        pooler = model.bert.pooler
        pooler.forward = lambda hidden_states: pooler.activation(pooler.dense(masked_mean(hidden_states, seen["mask"])))
    else:
        raise SystemExit(f"mean_pooling.py: no head for model type {base!r}")
    return model


def patch(match: str) -> None:
    load = models.load_classifier

    def load_classifier(model_id, *args, **kwargs):
        model, tok = load(model_id, *args, **kwargs)
        return (read_mean(model) if match in str(model_id) else model), tok

    models.load_classifier = load_classifier  # stages look it up on the module at each call


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    patch(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
