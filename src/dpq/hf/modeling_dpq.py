"""Hugging Face classes for the classifiers dpq compresses: pruned (heads and FFN neurons removed, a different number
in each layer), vocabulary-trimmed and packed 4-bit models load with ``AutoModelForSequenceClassification`` and
``pipeline("text-classification")``.

This file imports only torch, transformers and safetensors. dpq saves a copy of it beside every such model, and the
folder's ``config.json`` points ``auto_map`` at it, so ``from_pretrained(DIR, trust_remote_code=True)`` works where dpq
is not installed; ``import dpq`` registers the same classes with the Auto classes, so there no flag is needed. dpq's own
pruning and vocabulary trimming build their shapes with the functions below, so both loaders rebuild a model the
same way.

Every shape comes from ``config.json``: a config of type ``dpq-<base>`` (``dpq-bert``, ``dpq-mpnet``, …) is the base
architecture's config plus the records of the transforms applied to it (``dpq_transforms``) and their keys:
``dpq_kept_heads`` (per layer, the original indices of the heads kept), ``dpq_ffn_sizes`` (per layer, the FFN width),
``dpq_vocab_original`` (the tokenizer's vocabulary size, when the embedding table keeps fewer rows) and ``dpq_quant``
(the packed 4/8-bit tensors in ``model.quant.safetensors``; they load as their dequantized float values, the exact grid
the model was quantized to).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

PACKED_FILE = "model.quant.safetensors"
PREFIX = "dpq-"  # model_type of a transformed model: PREFIX + the base architecture's model_type
# the transforms this file rebuilds, with the newest record version it reads
KNOWN = {"prune": 1, "vocab": 1, "quant-packed": 1}
# folders written before dpq_transforms existed: the key each transform left in the config
LEGACY = {"prune": "dpq_kept_heads", "vocab": "dpq_vocab_original", "quant-packed": "dpq_quant"}


class UnsupportedArchitecture(ValueError):
    pass


# ----------------------------------------------------------------------------- the prunable parts of each layer


@dataclass
class Layer:
    attn: nn.Module  # the module whose head-count attributes change
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    ffn_in: nn.Linear
    ffn_out: nn.Linear
    head_dim: int

    @property
    def n_heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def ffn_size(self) -> int:
        return self.ffn_in.out_features


def _head_dim(config) -> int:
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads")
    return hidden // heads


def base_type(config) -> str:
    return config.model_type.removeprefix(PREFIX)


def layers(model: nn.Module) -> list[Layer]:
    """The prunable parts of each encoder layer of a BERT-, RoBERTa-, MPNet- or DistilBERT-style model."""
    mt = base_type(model.config)
    d = _head_dim(model.config)
    if mt in ("bert", "roberta", "xlm-roberta", "electra"):
        enc = getattr(model, model.base_model_prefix).encoder.layer
        return [Layer(l.attention.self, l.attention.self.query, l.attention.self.key, l.attention.self.value,
                      l.attention.output.dense, l.intermediate.dense, l.output.dense, d) for l in enc]
    if mt == "mpnet":
        enc = model.mpnet.encoder.layer
        return [Layer(l.attention.attn, l.attention.attn.q, l.attention.attn.k, l.attention.attn.v,
                      l.attention.attn.o, l.intermediate.dense, l.output.dense, d) for l in enc]
    if mt == "distilbert":
        enc = model.distilbert.transformer.layer
        return [Layer(l.attention, l.attention.q_lin, l.attention.k_lin, l.attention.v_lin, l.attention.out_lin,
                      l.ffn.lin1, l.ffn.lin2, d) for l in enc]
    raise UnsupportedArchitecture(f"pruning supports BERT-, RoBERTa-, MPNet- and DistilBERT-style encoders, not '{mt}'")


# ----------------------------------------------------------------------------- smaller layers


def _slice_linear(lin: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    """Keep rows (dim 0, outputs) or columns (dim 1, inputs) ``idx`` of ``lin`` in place."""
    w = lin.weight.data.index_select(dim, idx.to(lin.weight.device)).clone()
    lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if dim == 0:
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data.index_select(0, idx.to(lin.bias.device)).clone())
        lin.out_features = len(idx)
    else:
        lin.in_features = len(idx)


def _set_heads(attn: nn.Module, n: int, d: int) -> None:
    for name in ("num_attention_heads", "n_heads"):
        if hasattr(attn, name):
            setattr(attn, name, n)
    if hasattr(attn, "all_head_size"):
        attn.all_head_size = n * d


def shrink_layer(l: Layer, keep_heads: torch.Tensor, keep_ffn: torch.Tensor) -> None:
    d = l.head_dim
    rows = (keep_heads[:, None] * d + torch.arange(d, device=keep_heads.device)[None, :]).reshape(-1)
    for lin in (l.q, l.k, l.v):
        _slice_linear(lin, rows, 0)
    _slice_linear(l.o, rows, 1)
    _set_heads(l.attn, len(keep_heads), d)
    _slice_linear(l.ffn_in, keep_ffn, 0)
    _slice_linear(l.ffn_out, keep_ffn, 1)


def install_bias_selectors(model: nn.Module, kept: list[list[int]]) -> None:
    """MPNet adds one relative-position bias (all heads) to every layer: give each layer its own heads' rows."""
    if base_type(model.config) != "mpnet":
        return
    for l, heads in zip(layers(model), kept):
        dev = l.q.weight.device
        # from_pretrained builds on the meta device before loading: an index there could never be read
        idx = torch.tensor(heads, device="cpu" if dev.type == "meta" else dev)

        def pre(module, args, kwargs, idx=idx):
            # MPNetAttention passes (hidden_states, attention_mask, position_bias) positionally
            if "position_bias" in kwargs:
                pb = kwargs["position_bias"]
                if pb is not None and pb.shape[1] != len(idx):
                    kwargs["position_bias"] = pb.index_select(1, idx.to(pb.device))
            elif len(args) > 2 and args[2] is not None and args[2].shape[1] != len(idx):
                args = args[:2] + (args[2].index_select(1, idx.to(args[2].device)),) + args[3:]
            return args, kwargs

        if getattr(l.attn, "_dpq_bias_hook", None) is not None:
            l.attn._dpq_bias_hook.remove()
        l.attn._dpq_bias_hook = l.attn.register_forward_pre_hook(pre, with_kwargs=True)


def restore_structure(model: nn.Module) -> nn.Module:
    """Give a freshly built (unpruned-shape) model the pruned shapes recorded in its config."""
    kept = getattr(model.config, "dpq_kept_heads", None)
    sizes = getattr(model.config, "dpq_ffn_sizes", None)
    if not kept:
        return model
    for l, heads, f in zip(layers(model), kept, sizes):
        dev = l.q.weight.device
        # shapes only: weights are loaded next
        shrink_layer(l, torch.arange(len(heads), device=dev), torch.arange(f, device=dev))
    install_bias_selectors(model, kept)
    return model


# ----------------------------------------------------------------------------- trimmed vocabulary


class RemappedEmbedding(nn.Embedding):
    """An embedding over the kept rows, looked up through ``remap`` (int32, one entry per original id)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, original_vocab: int, padding_idx: int | None = None,
                 device=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device)
        self.register_buffer("remap", torch.zeros(original_vocab, dtype=torch.int32, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(self.remap[ids].long())


def restore_vocab(model: nn.Module) -> nn.Module:
    """Give a model built from a trimmed config its remapped table (weights are loaded next)."""
    original = getattr(model.config, "dpq_vocab_original", None)
    if not original:
        return model
    emb = getattr(model, model.base_model_prefix, model).embeddings
    old = emb.word_embeddings
    emb.word_embeddings = RemappedEmbedding(old.num_embeddings, old.embedding_dim, original, old.padding_idx,
                                            device=old.weight.device)
    return model


# ----------------------------------------------------------------------------- packed 4/8-bit weights


def _unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    lo, hi = packed & 0x0F, packed >> 4  # even index in the low nibble
    return torch.stack([lo, hi], dim=-1).flatten(-2)[..., :n]


def _per_column(per_group: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    return per_group.float().repeat_interleave(group_size, dim=1)[:, :cols]


def dequantized_state(tensors: dict[str, torch.Tensor], quant: dict) -> dict[str, torch.Tensor]:
    """The float state dict a packed file stands for: ``(code - zero) * scale`` per group of input columns."""
    out = dict(tensors)
    for name, info in quant.get("tensors", {}).items():
        (rows, cols), bits, g = info["shape"], info["bits"], info["group_size"]
        groups = -(-cols // g)
        unpack = (lambda t, n: _unpack_int4(t, n)) if bits == 4 else (lambda t, n: t)
        try:
            codes = unpack(out.pop(f"{name}.qcodes"), cols)
            scales = out.pop(f"{name}.scales")
        except KeyError as e:
            raise ValueError(f"{PACKED_FILE}: missing {e.args[0]}, which config.json's dpq_quant lists") from None
        zeros = out.pop(f"{name}.zeros", None)
        zeros = (torch.full((rows, groups), 2 ** (bits - 1), dtype=torch.uint8) if zeros is None
                 else unpack(zeros, groups))
        if tuple(codes.shape) != (rows, cols) or tuple(scales.shape) != (rows, groups):
            raise ValueError(f"{PACKED_FILE}: {name} has shape {tuple(codes.shape)}, config.json says {(rows, cols)}")
        out[name] = (codes.float() - _per_column(zeros, cols, g)) * _per_column(scales, cols, g)
    return out


# ----------------------------------------------------------------------------- the recorded transforms


def recorded(config) -> list[str]:
    """Names of the transforms ``config`` records, in the order applied; refuses one this file cannot rebuild."""
    recs = getattr(config, "dpq_transforms", None)
    if recs is None:
        recs = [{"name": n, "version": 1} for n, key in LEGACY.items() if getattr(config, key, None)]
    names = []
    for rec in recs:
        name, version = rec.get("name"), rec.get("version", 1)
        if name not in KNOWN:
            raise ValueError(f"config.json records the dpq transform {name!r}, which this modeling file cannot "
                             "rebuild; load the folder with dpq (`dpq.load(DIR)`) where its plugin is installed")
        if version > KNOWN[name]:
            raise ValueError(f"config.json records {name} version {version}; this modeling file reads up to version "
                             f"{KNOWN[name]}: load it with the dpq that wrote it")
        names.append(name)
    return names


def rebuild(model: nn.Module) -> nn.Module:
    """Give a model built from a config at its base architecture's shapes the shapes its records describe."""
    for name in recorded(model.config):
        if name == "prune":
            restore_structure(model)
        elif name == "vocab":
            restore_vocab(model)
    return model


# ----------------------------------------------------------------------------- the classes


def base_names(base: str) -> tuple[str, str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if not isinstance(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(base), str):  # absent, or several
        raise UnsupportedArchitecture(f"transformers has no single sequence-classification model of type '{base}'")
    return CONFIG_MAPPING_NAMES[base], MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[base]


_CLASSES: dict[str, tuple[type, type]] = {}


def classes(base: str) -> tuple[type, type]:
    """(config class, model class) of a transformed model of base type ``base``, made once per process.

    Subclasses of the base architecture's own classes: the state dict keeps the base model's names, so weights
    saved by the base class load unchanged and every transformers feature of the base class still applies.
    """
    if base in _CLASSES:
        return _CLASSES[base]
    config_name, model_name = base_names(base)
    base_config, base_model = getattr(transformers, config_name), getattr(transformers, model_name)
    config_cls = type(f"Dpq{config_name}", (base_config,), {"model_type": PREFIX + base, "__module__": __name__})

    def __init__(self, config, *args, **kwargs):
        base_model.__init__(self, config, *args, **kwargs)
        rebuild(self)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """What is saved is float weights (a packed checkpoint was loaded dequantized): the config drops the packing,
        and the modeling code goes along, so the saved folder loads the way this one did, with or without dpq."""
        config = self.config
        quant, recs = getattr(config, "dpq_quant", None), getattr(config, "dpq_transforms", None)
        if quant is not None:
            del config.dpq_quant
            if recs is not None:
                config.dpq_transforms = [r for r in recs if r.get("name") != "quant-packed"]
        config.auto_map = auto_map(base)
        try:
            out = base_model.save_pretrained(self, save_directory, *args, **kwargs)
        finally:
            if quant is not None:
                config.dpq_quant, config.dpq_transforms = quant, recs
        if kwargs.get("is_main_process", True):
            shutil.copyfile(__file__, os.path.join(save_directory, os.path.basename(__file__)))
        return out

    model_cls = type(f"Dpq{model_name}", (base_model,), {
        "config_class": config_cls, "__init__": __init__, "__module__": __name__, "save_pretrained": save_pretrained,
        "from_pretrained": classmethod(_from_pretrained(base_model.from_pretrained.__func__))})
    _CLASSES[base] = (config_cls, model_cls)
    return config_cls, model_cls


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def _from_pretrained(parent):
    """``from_pretrained``, and for a packed checkpoint (``model.quant.safetensors``, no ``model.safetensors``) the
    same call on its dequantized weights."""

    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        if not isinstance(config, transformers.PretrainedConfig):
            config, kwargs = cls.config_class.from_pretrained(
                config or pretrained_model_name_or_path, return_unused_kwargs=True, **kwargs)
        quant = getattr(config, "dpq_quant", None)
        if not quant:
            return parent(cls, pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        from transformers.utils import cached_file

        path = cached_file(pretrained_model_name_or_path, PACKED_FILE,
                           **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
        state = dequantized_state(load_file(path), quant)
        model = parent(cls, None, *model_args, config=config, state_dict=state, **kwargs)
        model.config.name_or_path = str(pretrained_model_name_or_path)
        return model

    return from_pretrained


def __getattr__(name: str):
    """``DpqBertConfig``, ``DpqBertForSequenceClassification``, …: made on first use, so ``auto_map`` can name
    them (transformers reads them from this module by name)."""
    if name.startswith("Dpq"):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

        for base, model_name in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.items():
            if name in (f"Dpq{CONFIG_MAPPING_NAMES.get(base)}", f"Dpq{model_name}"):
                config_cls, model_cls = classes(base)
                return config_cls if name == config_cls.__name__ else model_cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def auto_map(base: str) -> dict[str, str]:
    """``config.json``'s ``auto_map``: where ``trust_remote_code=True`` finds the classes, in this file's copy."""
    config_name, model_name = base_names(base)
    module = __name__.rsplit(".", 1)[-1]
    return {"AutoConfig": f"{module}.Dpq{config_name}",
            "AutoModelForSequenceClassification": f"{module}.Dpq{model_name}"}


# registered eagerly where transformers' config table cannot be asked lazily (its private layout changed)
FALLBACK_BASES = ("bert", "roberta", "xlm-roberta", "electra", "mpnet", "distilbert")


def register_type(model_type: str) -> bool:
    """Register the classes of ``dpq-<base>`` with the Auto classes; False when it names no base transformers has a
    single sequence classifier for."""
    if not isinstance(model_type, str) or not model_type.startswith(PREFIX):
        return False
    try:
        config_cls, model_cls = classes(model_type.removeprefix(PREFIX))
    except (UnsupportedArchitecture, AttributeError, ImportError):
        return False
    from transformers import AutoConfig, AutoModelForSequenceClassification

    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModelForSequenceClassification.register(config_cls, model_cls, exist_ok=True)
    return True


class _TypesOnDemand(dict):
    """The config table's registered types, which also answer for any ``dpq-<base>`` when first asked: so a folder
    dpq writes for any base transformers knows loads, without importing a hundred modeling files up front."""

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, key) or (isinstance(key, str) and key.startswith(PREFIX) and register_type(key))


def register() -> None:
    """Make ``AutoConfig``, ``AutoModelForSequenceClassification`` and pipelines load ``dpq-<base>`` folders, for every
    base as its folder is first read."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    extra = getattr(CONFIG_MAPPING, "_extra_content", None)
    if type(extra) is dict:
        CONFIG_MAPPING._extra_content = _TypesOnDemand(extra)
    elif not isinstance(extra, _TypesOnDemand):
        for base in FALLBACK_BASES:
            register_type(PREFIX + base)
