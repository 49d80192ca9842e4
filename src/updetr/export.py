"""``updetr export``: a trained model as an ONNX file that ONNX Runtime runs with no PyTorch.

Three checkpoint kinds, one graph each (inputs and outputs named as below, every size dynamic unless noted):

    detection   pixels (B, 3, H, W)                                -> logits (B, Q, C+1), boxes (B, Q, 4)
    pretrain    pixels (B, 3, H, W), query_patches (B, M, 3, q, q) -> logits (B, Q, 2),   boxes (B, Q, 4)
    oneshot     pixels (B, 3, H, W), query_patch (B, 3, q, q)      -> logits (B, Q, 2),   boxes (B, Q, 4)

``pixels`` are what the evaluation transform gives (shortest side ``data.val_size``, longest at most
``data.max_size``, ImageNet mean / std), one image per batch entry **with no padding**: the graph has no padding
mask input, so a batch holds images of one size (pad-and-mask batching is PyTorch-only). ``boxes`` are normalised
(cx, cy, w, h) in [0, 1] of the image; ``logits`` are raw (softmax over the last axis; the last class is "no
object"). The post-processing (softmax, top score, scaling to pixels) is left to the caller, as
:func:`updetr.evaluation.postprocess.postprocess_detections` does it. The pre-training graph takes exactly M query
patches (its decoder's group mask is built for M); query patch side ``q`` is dynamic, as in PyTorch.

The file's metadata (``metadata_props``) records the task, class names, the transform sizes and normalisation,
so a caller can reproduce the input without the checkpoint.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .engine.inference import load_trained
from .models.updetr import group_attention_mask
from .structures import IMAGENET_MEAN, IMAGENET_STD, ImageBatch

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is a single ONNX op from opset 17 on
# The graph's output names: part of the file's format (callers fetch them by name), so ``boxes`` stays ``boxes``
# although in Python the tensor is ``DetectionOutput.boxes_cxcywh``.
OUTPUT_NAMES = ("logits", "boxes")


class ExportError(ValueError):
    """The checkpoint cannot be exported, or the exported file cannot be written; the message names the file."""


class _Graph(nn.Module):
    """The forward pass of a DETR-family model on unpadded pixels, with no data-dependent branch.

    The same modules as ``DETR.forward_hidden`` (CNN body, position encoding, input projection, encoder, decoder,
    heads), called without the padding mask: ``Transformer.forward`` decides at run time whether a mask is
    needed, which a static graph cannot, and the frozen CNN's per-image grouping (``backbone_unpadded``) is a
    batching optimisation that changes nothing for unpadded images.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _hidden(self, pixels: Tensor, query_extra: Tensor | None, self_attn_mask: Tensor | None,
                num_queries: int) -> Tensor:
        model = self.model
        src = list(model.backbone.body.body(pixels).values())[-1]  # (B, Cb, h, w)
        b, _, h, w = src.shape
        mask = torch.zeros((b, h, w), dtype=torch.bool, device=pixels.device)
        pos = model.backbone[1](mask).to(src.dtype).flatten(2).transpose(1, 2)  # (B, h*w, D)
        memory = model.transformer.encoder(model.input_proj(src).flatten(2).transpose(1, 2), None, pos)
        query_pos = model.query_embed.weight[:num_queries].unsqueeze(0).expand(b, -1, -1)
        if query_extra is not None:
            query_pos = query_pos + query_extra
        return model.transformer.decoder(torch.zeros_like(query_pos), memory, self_attn_mask=self_attn_mask,
                                         memory_key_padding_mask=None, pos=pos, query_pos=query_pos)

    def _heads(self, hs: Tensor) -> tuple[Tensor, Tensor]:
        last = hs[-1]
        return self.model.class_embed(last), self.model.bbox_embed(last).sigmoid()


class DetectorGraph(_Graph):
    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        return self._heads(self._hidden(pixels, None, None, self.model.num_queries))


class QueryPatchGraph(_Graph):
    """UP-DETR pre-training: M query patches per image, each added to its own group of Q/M queries."""

    def forward(self, pixels: Tensor, query_patches: Tensor) -> tuple[Tensor, Tensor]:
        model = self.model
        b, k = query_patches.shape[0], model.num_patches
        features = model.backbone.body.pooled_features(query_patches.flatten(0, 1)).view(b, k, -1)
        extra = model.patch2query(features).repeat_interleave(model.queries_per_patch, dim=1)  # (B, Q, D)
        mask = None
        if model.attention_mask:
            mask = group_attention_mask(model.num_queries, k, pixels.device)
        return self._heads(self._hidden(pixels, extra, mask, model.num_queries))


class OneShotGraph(_Graph):
    """One-shot detection: one query patch per image, added to every object query."""

    def forward(self, pixels: Tensor, query_patch: Tensor) -> tuple[Tensor, Tensor]:
        _, embedding = self.model.encode_query_patches(query_patch)  # (B, D)
        return self._heads(self._hidden(pixels, embedding.unsqueeze(1), None, self.model.num_queries))


@dataclass
class ExportedModel:
    """What :func:`load_for_export` read: the model in eval mode and what the ONNX file records about it."""

    model: nn.Module
    task: str  # detection | pretrain | oneshot
    config: object  # updetr.config.Config
    classes: list[str]

    @property
    def query_size(self) -> int:
        return int(self.config.pretrain.query_size)

    def graph(self) -> _Graph:
        return {"detection": DetectorGraph, "pretrain": QueryPatchGraph, "oneshot": OneShotGraph}[self.task](self.model).eval()

    def example_inputs(self, height: int, width: int, batch: int = 1, seed: int = 0) -> tuple[Tensor, ...]:
        """Random normalised inputs of the graph's shapes (what the parity check and the benchmark feed)."""
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randn(batch, 3, height, width, generator=g)
        q = self.query_size
        if self.task == "detection":
            return (pixels,)
        if self.task == "pretrain":
            return pixels, torch.randn(batch, self.model.num_patches, 3, q, q, generator=g)
        return pixels, torch.randn(batch, 3, q, q, generator=g)

    def input_names(self) -> list[str]:
        return {"detection": ["pixels"], "pretrain": ["pixels", "query_patches"], "oneshot": ["pixels", "query_patch"]}[self.task]

    def reference(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """The PyTorch model's own forward (not the export graph) on ``inputs``: what the ONNX file must match."""
        pixels = inputs[0]
        batch = ImageBatch(pixels, torch.zeros(pixels.shape[0], *pixels.shape[2:], dtype=torch.bool))
        with torch.inference_mode():
            out = self.model(batch) if self.task == "detection" else self.model(batch, inputs[1])
        return out.logits, out.boxes_cxcywh

    def metadata(self) -> dict[str, str]:
        data = self.config.data
        meta = {"task": self.task, "classes": json.dumps(self.classes), "val_size": str(data.val_size),
                "max_size": str(data.max_size), "mean": json.dumps(list(IMAGENET_MEAN)),
                "std": json.dumps(list(IMAGENET_STD)), "num_queries": str(self.model.num_queries),
                "producer": "updetr export"}
        if self.task != "detection":
            meta["query_size"] = str(self.query_size)
        if self.task == "pretrain":
            meta["num_patches"] = str(self.model.num_patches)
        return meta


def load_for_export(checkpoint: str | Path) -> ExportedModel:
    """Read a detection, pre-training or one-shot checkpoint (safe loading, strict weights), on CPU in eval mode."""
    loaded = load_trained(checkpoint, "cpu", tasks=("detection", "pretrain", "oneshot"))
    classes = ["match"] if loaded.task == "oneshot" else list(loaded.classes)
    return ExportedModel(loaded.model, loaded.task, loaded.config, classes)


def export_onnx(checkpoint: str | Path | ExportedModel, out: str | Path, *,
                example_size: tuple[int, int] | None = None) -> Path:
    """Write ``checkpoint``'s model (a path, or what :func:`load_for_export` read from one) to ``out`` (a single
    ``.onnx`` file, weights inside) and return its path.

    Batch, image height and width (and the query patch side) are dynamic; ``example_size`` is only the size
    traced (default: the evaluation size of a square image, ``data.val_size``).
    """
    out = Path(out)
    try:
        import onnx
    except ImportError:
        raise ExportError("updetr export needs the onnx package: pip install 'updetr[export]' "
                          "(or pip install -e '.[export]' in a clone)") from None
    if out.is_dir():
        raise ExportError(f"{out}: is a folder; name the file to write, e.g. {out / 'model.onnx'}")
    exported = checkpoint if isinstance(checkpoint, ExportedModel) else load_for_export(checkpoint)
    size = example_size or (exported.config.data.val_size,) * 2
    graph = exported.graph()
    inputs = exported.example_inputs(*size, batch=2)
    names = exported.input_names()
    axes: dict[str, dict[int, str]] = {"pixels": {0: "batch", 2: "height", 3: "width"},
                                       **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    if exported.task == "pretrain":
        axes["query_patches"] = {0: "batch", 3: "patch_height", 4: "patch_width"}
    elif exported.task == "oneshot":
        axes["query_patch"] = {0: "batch", 2: "patch_height", 3: "patch_width"}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"{out}: cannot create its folder ({err.strerror or err})") from None
    tmp = out.with_name(out.name + ".tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter: it traces shapes as values, so TF "same" padding stays size-dependent
            # (torch.export's symbolic shapes take minutes on EfficientNet's chained ceil divisions)
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, inputs, str(tmp), dynamo=False, opset_version=OPSET, input_names=names,
                              output_names=list(OUTPUT_NAMES), dynamic_axes=axes, do_constant_folding=True)
        model_proto = onnx.load(str(tmp))
        for key, value in exported.metadata().items():
            entry = model_proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save_model(model_proto, str(tmp))
        tmp.replace(out)
    except OSError as err:
        raise ExportError(f"{out}: cannot write the ONNX file ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)  # nothing half-written is left (after the rename there is nothing to remove)
    log.info("wrote %s (%s model, opset %d)", out, exported.task, OPSET)
    return out


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session for ``path`` (``threads``: intra-op threads; None = ONNX Runtime's default)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("running an ONNX file needs onnxruntime: pip install onnxruntime") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportError(f"{path}: ONNX Runtime cannot load it ({str(err).splitlines()[0]})") from None


def parity(exported: ExportedModel, session, sizes: list[tuple[int, int]], batch: int = 2) -> list[dict[str, float]]:
    """Max abs difference between ONNX Runtime and PyTorch on random inputs of each (height, width), one row per
    size keyed by ``height``, ``width``, ``batch`` and each output name (``OUTPUT_NAMES``)."""
    rows = []
    names = [i.name for i in session.get_inputs()]
    for height, width in sizes:
        inputs = exported.example_inputs(height, width, batch=batch, seed=height * 7919 + width)
        expected = exported.reference(inputs)  # (logits, boxes_cxcywh), in OUTPUT_NAMES order
        got = session.run(list(OUTPUT_NAMES), {n: t.numpy() for n, t in zip(names, inputs)})
        rows.append({"height": height, "width": width, "batch": batch,
                     **{name: float((torch.from_numpy(g) - e).abs().max()) for name, g, e in zip(OUTPUT_NAMES, got, expected)}})
    return rows


__all__ = ["OPSET", "OUTPUT_NAMES", "ExportError", "ExportedModel", "export_onnx", "load_for_export", "onnx_session", "parity"]
