"""Load and convert the checkpoints published with DETR and UP-DETR.

The authors' ``.pth`` files are dicts whose ``model`` entry is the state dict
(docs/method.md §5), sometimes with ``args`` (an ``argparse.Namespace``). Our models use the
same key names, so a file loads strictly once the architecture is known. It is read
from the tensors themselves; what the tensors cannot tell has the published default and
a keyword override:

==========================  ==========================================================
inferred from the tensors   backbone (resnet18/34/50/101), hidden_dim, num_queries,
                            num_classes, enc_layers, dec_layers, ffn_dim, pre_norm
                            (``transformer.encoder.norm``), position_embedding
                            (``backbone.1.row_embed``), pre-training
                            (``patch2query``), feature_reconstruction
                            (``feature_align``)
from ``args`` when present  num_heads (``nheads``), dilation, num_patches, dropout,
                            aux_loss, query_shuffle
otherwise the default       num_heads=8, dilation=False (DC5 files need
                            ``dilation=True``), num_patches=10
==========================  ==========================================================

Keyword overrides win over everything; a wrong one makes the strict load fail with the
mismatching keys. Pre-training files have DETR's 3-way head (index 0 unused, 1 = patch,
2 = no object); ours is 2-way (0 = patch, 1 = no object), so rows 1–2 are kept: boxes
and features are unchanged, and the logits are the authors' ``pred_logits[..., 1:]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..config import Config, ConfigError, ModelConfig, PretrainConfig
from ..serialization import CheckpointError, format_keys, load_state_dict_strict, safe_torch_load, save_checkpoint
from .detr import build_detr
from .updetr import build_updetr

log = logging.getLogger(__name__)

# COCO 2017 category names at their ids; DETR predicts label == category id (0 and the
# ten unused ids are "N/A"), hence 91 classes + no-object = 92 logits.
COCO_CATEGORIES: dict[int, str] = dict(enumerate([
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A",
    "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
]))

_RESNET_BLOCKS = {  # (bottleneck?, blocks per stage) -> torchvision name
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
}
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_PRETRAIN_FIELDS = {f.name for f in dataclasses.fields(PretrainConfig)}
_ARGS_TO_FIELD = {  # the authors' argparse names -> (section, field); only settings tensors cannot show
    "nheads": ("model", "num_heads"),
    "dilation": ("model", "dilation"),
    "dropout": ("model", "dropout"),
    "aux_loss": ("model", "aux_loss"),
    "num_patches": ("pretrain", "num_patches"),
    "query_shuffle": ("pretrain", "query_shuffle"),
}


@dataclass
class OfficialCheckpoint:
    """An official file translated to our layout: weights, resolved config and task."""

    state: dict[str, Tensor]  # our key names and head layout; loads strictly into ``build()``
    config: Config  # model/pretrain settings inferred (+ overrides); model.num_classes set
    task: str  # detection | pretrain
    description: str  # e.g. "UP-DETR pre-training, resnet50, pre-norm, 6+6 layers, ..."
    classes: list[str] | None = None  # an updetr checkpoint's own class names (official files have none)
    category_ids: list[int] | None = None

    def build(self) -> nn.Module:
        """Our model for this checkpoint, weights loaded strictly, in eval mode."""
        if self.task == "pretrain":
            model = build_updetr(self.config.model, self.config.pretrain)
        else:
            model = build_detr(self.config.model, self.config.model.num_classes)
        load_state_dict_strict(model, self.state, self.description)
        return model.eval()


def load_official_checkpoint(path: str | Path, **overrides: Any) -> nn.Module:
    """Our DETR/UPDETR holding the weights of an official DETR or UP-DETR ``.pth`` (eval mode).

    Detectors are called as ``model(images)``; pre-training checkpoints as
    ``model(images, query_patches)``. ``overrides``: any :class:`ModelConfig` or
    :class:`PretrainConfig` field, e.g. ``dilation=True`` for DC5 files, ``num_heads``,
    ``num_patches``. Raises :class:`CheckpointError` (naming the file and the keys) when
    the file is unreadable or its weights do not fit.
    """
    return read_official_checkpoint(path, **overrides).build()


def convert_official_checkpoint(src: str | Path, dst: str | Path, **overrides: Any) -> Path:
    """Write ``src`` (official DETR/UP-DETR) as one of our checkpoints at ``dst`` (atomically).

    The result loads with :func:`updetr.engine.inference.load_trained`. An updetr
    checkpoint (a training or converted one) keeps its stored config, task, class names and ids
    (``overrides`` still win), so its predictions are unchanged; the result holds the weights
    only (no optimizer: it cannot be resumed). A COCO
    detector (92 logits) gets the 91 COCO slots as classes with ``category_ids[i] == i``
    (DETR's label == category id); other detectors get ``class_i`` names, also with
    label == id; pre-training files get task ``pretrain`` and classes ``["patch"]``.
    """
    ckpt = read_official_checkpoint(src, **overrides)
    model = ckpt.build()  # validates the weights strictly before anything is written
    if ckpt.classes is not None:  # an updetr checkpoint: its own names and ids
        classes = list(ckpt.classes)
        category_ids = list(ckpt.category_ids or range(1, len(classes) + 1))
    elif ckpt.task == "pretrain":
        classes, category_ids = ["patch"], [1]
    else:
        num_classes = ckpt.config.model.num_classes
        if num_classes == len(COCO_CATEGORIES):
            classes = [COCO_CATEGORIES[i] for i in range(num_classes)]
        else:
            classes = [f"class_{i}" for i in range(num_classes)]
        category_ids = list(range(num_classes))
    dst = Path(dst)
    save_checkpoint(dst, {
        "model": model.state_dict(),
        "config": ckpt.config.to_dict(),
        "task": ckpt.task,
        "classes": classes,
        "category_ids": category_ids,
        "epoch": -1,
        "converted_from": str(src),
    })
    log.info("converted %s -> %s", ckpt.description, dst)
    return dst


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["num_heads=8", "model.dilation=true"]`` -> keyword overrides (values parsed as JSON when possible)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like field=value, e.g. dilation=true")
        key, raw = (s.strip() for s in item.split("=", 1))
        key = key.removeprefix("model.").removeprefix("pretrain.")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def read_official_checkpoint(path: str | Path, **overrides: Any) -> OfficialCheckpoint:
    """Read an official file, infer its architecture and translate its weights (no model built)."""
    path = Path(path)
    state, args, ours = _read_file(path)
    _check_overrides(overrides)
    if ours is not None:
        return _from_updetr_checkpoint(path, state, ours, overrides)
    _reject_unsupported(state, path)
    model_fields, pretrain_fields, task = _infer(state, path)
    for name, (section, field) in _ARGS_TO_FIELD.items():
        if name in args and args[name] is not None:
            (model_fields if section == "model" else pretrain_fields)[field] = args[name]
    if args.get("position_embedding") in ("learned", "v3") and model_fields["position_embedding"] == "sine":
        log.warning("%s: args say learned position embedding but there are no row_embed weights; using sine", path)

    for key, value in overrides.items():
        (model_fields if key in _MODEL_FIELDS else pretrain_fields)[key] = value

    defaults = Config().to_dict()
    defaults["model"].update(model_fields, backbone_weights="none")
    defaults["pretrain"].update(pretrain_fields)
    try:
        config = Config.from_dict(defaults, f"{path} (inferred architecture + overrides)")
        if task == "pretrain":
            config.check_query_groups()
    except ConfigError as err:
        hint = " (it cannot be read from the weights: pass num_patches=M)" if "num_patches" in str(err) else ""
        raise ConfigError(f"{path}: {err}{hint}") from None

    if task == "pretrain":
        state = _to_two_way_head(state, path)
    m = config.model
    description = (
        f"{path} ({'UP-DETR pre-training' if task == 'pretrain' else 'detector'}: {m.backbone}"
        f"{'-DC5' if m.dilation else ''}, {'pre' if m.pre_norm else 'post'}-norm, {m.enc_layers}+{m.dec_layers} layers, "
        f"D={m.hidden_dim}, {m.num_heads} heads, FFN {m.ffn_dim}, Q={m.num_queries}, "
        + (f"M={config.pretrain.num_patches}, feature reconstruction {'on' if config.pretrain.feature_reconstruction else 'off'})"
           if task == "pretrain" else f"C={m.num_classes})")
    )
    return OfficialCheckpoint(state=state, config=config, task=task, description=description)


def _check_overrides(overrides: dict[str, Any]) -> None:
    bad = sorted(set(overrides) - _MODEL_FIELDS - _PRETRAIN_FIELDS)
    if bad:
        raise ConfigError(
            f"unknown override(s) {', '.join(bad)}; use ModelConfig fields ({', '.join(sorted(_MODEL_FIELDS))}) "
            f"or PretrainConfig fields ({', '.join(sorted(_PRETRAIN_FIELDS))})"
        )
    if "backbone_weights" in overrides:
        raise ConfigError("backbone_weights cannot be overridden: the backbone weights come from the checkpoint")


def _from_updetr_checkpoint(path: Path, state: dict[str, Tensor], ours: dict[str, Any],
                            overrides: dict[str, Any]) -> OfficialCheckpoint:
    """One of our own checkpoints: the architecture, task and classes it stores, not inferred ones."""
    task = ours.get("task", "detection")
    if task not in ("detection", "pretrain"):
        raise CheckpointError(f"{path}: is an updetr {task} checkpoint; use it as it is (convert is for detectors "
                              "and pre-training checkpoints)")
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in ours["config"].items()}
    for key, value in overrides.items():
        data["model" if key in _MODEL_FIELDS else "pretrain"][key] = value
    data["model"]["backbone_weights"] = "none"  # the weights come from the checkpoint
    try:
        config = Config.from_dict(data, f"{path} (its stored config + overrides)")
    except ConfigError as err:
        raise CheckpointError(f"{path}: its stored config is not valid: {err}") from None
    classes = list(ours["classes"]) if ours.get("classes") else None
    if task == "detection" and config.model.num_classes is None:
        config.model.num_classes = len(classes) if classes else int(state["class_embed.weight"].shape[0]) - 1
    m = config.model
    description = (f"{path} (updetr {task} checkpoint, stored config: {m.backbone}, {m.enc_layers}+{m.dec_layers} "
                   f"layers, D={m.hidden_dim}, {m.num_heads} heads, Q={m.num_queries})")
    log.info("%s is an updetr checkpoint: its stored config, task and class names are used", path)
    return OfficialCheckpoint(state=state, config=config, task=task, description=description, classes=classes,
                              category_ids=list(ours["category_ids"]) if ours.get("category_ids") else None)


# ----------------------------------------------------------------------------- reading
def _read_file(path: Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any] | None]:
    """Safe ``torch.load`` (never unpickles code; allows ``argparse.Namespace``) -> (state dict, args,
    the whole dict when it is one of our checkpoints, with a stored ``config``; else None)."""
    obj = safe_torch_load(path, extra_globals=[argparse.Namespace])  # args may be an argparse.Namespace
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    if "model" in obj:
        state = obj["model"]
    elif obj and all(isinstance(v, Tensor) for v in obj.values()):
        state = obj  # a bare state dict
    else:
        raise CheckpointError(f"{path}: has no 'model' state dict (keys: {format_keys(sorted(map(str, obj)))})")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'model' is not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    config = obj.get("config")
    ours = obj if isinstance(config, dict) and isinstance(config.get("model"), dict) else None
    return dict(state), dict(args) if isinstance(args, dict) else {}, ours


def _reject_unsupported(state: dict[str, Tensor], path: Path) -> None:
    if any(k.startswith("detr.") for k in state):
        heads = sorted({k.split(".")[0] for k in state if not k.startswith("detr.")})
        raise CheckpointError(
            f"{path}: a DETR/UP-DETR panoptic segmentation checkpoint (DETRsegm: 'detr.'-prefixed detector plus "
            f"{', '.join(heads) or 'mask head'}); panoptic checkpoints are not supported, only detectors and "
            "UP-DETR pre-training checkpoints"
        )
    needed = ["query_embed.weight", "class_embed.weight", "input_proj.weight", "transformer.decoder.norm.weight"]
    absent = [k for k in needed if k not in state]
    if absent:
        raise CheckpointError(
            f"{path}: not a DETR/UP-DETR state dict (no {', '.join(absent)}); its keys: {format_keys(sorted(state))}"
        )


def _count(state: dict[str, Tensor], prefix: str) -> int:
    """Number of distinct ``prefix{i}.`` indices (0 when there are none)."""
    idx = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _infer(state: dict[str, Tensor], path: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    body = "backbone.0.body."
    blocks = tuple(_count(state, f"{body}layer{i}.") for i in range(1, 5))
    bottleneck = f"{body}layer1.0.conv3.weight" in state
    backbone = _RESNET_BLOCKS.get((bottleneck, blocks))
    if backbone is None:
        raise CheckpointError(
            f"{path}: backbone is not a torchvision ResNet-18/34/50/101 "
            f"({'bottleneck' if bottleneck else 'basic'} blocks per stage {blocks})"
        )
    num_queries, hidden_dim = state["query_embed.weight"].shape
    ffn_key = next((k for k in state if re.match(r"transformer\.(de|en)coder\.layers\.0\.linear1\.weight$", k)), None)
    model: dict[str, Any] = {
        "backbone": backbone,
        "hidden_dim": int(hidden_dim),
        "num_queries": int(num_queries),
        "enc_layers": _count(state, "transformer.encoder.layers."),
        "dec_layers": _count(state, "transformer.decoder.layers."),
        "pre_norm": "transformer.encoder.norm.weight" in state,
        "position_embedding": "learned" if "backbone.1.row_embed.weight" in state else "sine",
    }
    if ffn_key is not None:
        model["ffn_dim"] = int(state[ffn_key].shape[0])
    rows = int(state["class_embed.weight"].shape[0])
    if "patch2query.weight" in state:
        if rows not in (2, 3):
            raise CheckpointError(
                f"{path}: has UP-DETR's patch2query but a {rows}-way class head; only pre-training checkpoints "
                "(2 or 3 logits) carry query-patch modules, so this layout is not supported"
            )
        model["num_classes"] = 1
        return model, {"feature_reconstruction": "feature_align.layers.0.weight" in state}, "pretrain"
    if rows < 2:
        raise CheckpointError(f"{path}: class_embed has {rows} row(s); a detector needs C + 1 >= 2")
    model["num_classes"] = rows - 1
    return model, {}, "detection"


def _to_two_way_head(state: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """UP-DETR's 3-way head (unused, patch, no object) -> ours (patch, no object)."""
    if state["class_embed.weight"].shape[0] == 2:
        return state
    state = dict(state)
    for name in ("class_embed.weight", "class_embed.bias"):
        if name not in state:
            raise CheckpointError(f"{path}: missing {name}")
        state[name] = state[name][1:3].clone()
    return state
