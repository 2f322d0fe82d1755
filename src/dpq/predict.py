"""Using a compressed model: ``dpq.load(DIR).predict(texts)`` for a PyTorch or an exported ONNX folder.

Inputs are what users really send: very long strings are truncated to the model's limit (and counted),
control characters and odd Unicode go through the tokenizer's own cleaning, empty strings are classified
like any other text; anything that is not a string is refused naming its position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from . import models
from .data import Collator, pad_ids, truncate_ids
from .errors import DpqError
from .onnx import runtime

log = logging.getLogger("dpq")

MAX_CHARS = 1_000_000  # beyond this a "sentence" is a file pasted by mistake: refuse rather than tokenise it


@dataclass
class Prediction:
    label: str
    probability: float
    truncated: bool = False


class Predictor:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not folder.is_dir():
            raise DpqError(f"{folder}: no such model folder")
        self.folder = folder
        self.onnx = runtime.is_onnx_folder(folder)
        if self.onnx:
            self.session, self.config, self.tokenizer, info = runtime.load_onnx_folder(folder)
            self.runtime = info.get("runtime", "onnx")
        else:
            self.model, self.tokenizer = models.load_model(folder)
            self.config = self.model.config
            quant = getattr(self.config, "dpq_quant", None)
            self.runtime = f"torch-dequantized-int{quant['bits']}" if quant else "torch-fp32"
        limit = None if self.onnx else models.position_limit(self.model)  # RoBERTa-style: 2 fewer than the config's
        self.max_length = min(512, limit or getattr(self.config, "max_position_embeddings", 512))
        self.labels = [str(self.config.id2label[i]) for i in range(self.config.num_labels)]
        self._collate = Collator(pad_ids(self.tokenizer))

    def _check(self, texts) -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise DpqError(f"text {i + 1} is a {type(t).__name__}, not a string")
            if len(t) > MAX_CHARS:
                raise DpqError(f"text {i + 1} has {len(t)} characters (limit {MAX_CHARS}); split it first")
        return texts

    @torch.no_grad()
    def predict(self, texts, batch_size: int = 32) -> list[Prediction]:
        texts = self._check(texts)
        out: list[Prediction] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            # one tokenization, truncated by the same rule as training data (closing special token kept)
            cut = [truncate_ids(ids, self.max_length) for ids in
                   self.tokenizer(chunk, truncation=False, add_special_tokens=True)["input_ids"]]
            batch = self._collate([{"input_ids": ids, "labels": 0, "index": i} for i, (ids, _) in enumerate(cut)])
            if self.onnx:
                logits = torch.from_numpy(runtime.ort_logits(self.session, batch["input_ids"], batch["attention_mask"]))
            else:
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            probs = torch.softmax(logits.float(), -1)
            p, y = probs.max(-1)
            out += [Prediction(self.labels[int(c)], float(q), was_cut) for c, q, (_, was_cut) in zip(y, p, cut)]
        n = sum(p.truncated for p in out)
        if n:
            log.warning("%d of %d texts were longer than %d tokens and were truncated", n, len(out), self.max_length)
        return out


def load(folder: str | Path) -> Predictor:
    """A model folder (PyTorch, packed 4-bit, or an ONNX export) ready to ``predict(list_of_texts)``."""
    return Predictor(folder)


def read_lines(path: Path) -> list[str]:
    """One text per non-blank line of a UTF-8 file (``-``: standard input); a bad byte is reported with its line
    number. Lines end at a newline only: U+2028, U+0085 or a form feed inside a text are part of it."""
    import sys

    if str(path) == "-":
        path, raw = Path("<stdin>"), sys.stdin.buffer.read()
    else:
        path = Path(path)
        if not path.is_file():
            raise DpqError(f"{path}: no such file")
        raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DpqError(f"{path}: line {line} is not UTF-8 text") from None
    return [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
