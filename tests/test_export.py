"""`updetr export`: ONNX files that ONNX Runtime runs to PyTorch's numbers, at any batch and image size."""

import json

import onnx
import pytest
import torch

from updetr.cli import main
from updetr.presets import make_config
from updetr.engine.checkpoint import save_checkpoint
from updetr.export import export_onnx, load_for_export, onnx_session, parity
from updetr.models import build_detr, build_updetr
from updetr.models.one_shot import build_one_shot

# the embedded recipe's CNN (EfficientNet-Lite0: TF "same" padding that depends on the image size) with a
# narrow transformer, random weights
TINY = ["model.hidden_dim=32", "model.num_heads=4", "model.enc_layers=1", "model.dec_layers=2", "model.ffn_dim=64",
        "model.dropout=0.0", "model.backbone_weights=none"]
SIZES = [(224, 224), (193, 301)]  # a square multiple of 32 and an odd, non-square size
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    cfg = make_config("embedded", overrides=TINY)
    save_checkpoint(folder / "detector.pth", {"model": build_detr(cfg.model, 3).state_dict(), "config": cfg.to_dict(),
                                              "task": "detection", "classes": ["cat", "coffee", "rocket"]})
    pre = make_config("pretrain-embedded", overrides=TINY)
    save_checkpoint(folder / "pretrain.pth", {"model": build_updetr(pre.model, pre.pretrain).state_dict(),
                                              "config": pre.to_dict(), "task": "pretrain"})
    save_checkpoint(folder / "oneshot.pth", {
        "model": build_one_shot(cfg.model, train_backbone=False).state_dict(), "config": cfg.to_dict(),
        "task": "oneshot", "oneshot": {"split": {"seen": ["cat"], "unseen": ["rocket"]}, "options": {}}})
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["detector", "pretrain", "oneshot"])
def test_onnx_runtime_matches_pytorch_at_two_image_sizes_and_two_batch_sizes(checkpoints, tmp_path, kind, one_thread):
    out = export_onnx(checkpoints / f"{kind}.pth", tmp_path / f"{kind}.onnx")
    exported = load_for_export(checkpoints / f"{kind}.pth")
    session = onnx_session(out, threads=1)
    for batch in (1, 2):
        rows = parity(exported, session, SIZES, batch=batch)
        assert [(r["height"], r["width"]) for r in rows] == SIZES
        for row in rows:
            assert row["logits"] <= TOLERANCE and row["boxes"] <= TOLERANCE, row
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert inputs["pixels"] == ["batch", 3, "height", "width"]  # dynamic batch and image size
    if kind == "pretrain":  # the query patches are the second input: exactly M of them, any side
        assert inputs["query_patches"] == ["batch", exported.model.num_patches, 3, "patch_height", "patch_width"]
    if kind == "oneshot":
        assert inputs["query_patch"] == ["batch", 3, "patch_height", "patch_width"]
    assert [o.name for o in session.get_outputs()] == ["logits", "boxes"]
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["task"] == {"detector": "detection"}.get(kind, kind)
    assert meta["val_size"] == "224" and json.loads(meta["mean"]) == [0.485, 0.456, 0.406]
    if kind == "detector":
        assert json.loads(meta["classes"]) == ["cat", "coffee", "rocket"]


@pytest.mark.slow
def test_the_check_would_catch_a_different_model(checkpoints, tmp_path, one_thread):
    """The parity check can fail: the detector's file against another detector's weights is far off."""
    out = export_onnx(checkpoints / "detector.pth", tmp_path / "detector.onnx")
    other = load_for_export(checkpoints / "detector.pth")
    with torch.no_grad():
        other.model.class_embed.bias.add_(0.01)
    (row,) = parity(other, onnx_session(out, threads=1), SIZES[:1], batch=1)
    assert row["logits"] > TOLERANCE


@pytest.mark.slow
def test_cli_export_writes_the_file_and_checks_it(checkpoints, tmp_path, capsys, one_thread):
    out = tmp_path / "sub" / "model.onnx"
    assert main(["export", str(checkpoints / "pretrain.pth"), "--format", "onnx", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (ONNX opset 17" in printed
    diffs = [float(v.rstrip(",")) for line in printed.splitlines() if "max abs diff" in line
             for v in (line.split("logits ")[1].split(",")[0], line.split("boxes ")[1])]
    assert len(diffs) == 4 and max(diffs) <= TOLERANCE
    assert not list(out.parent.glob("*.tmp"))


def test_cli_export_errors_are_one_line_naming_the_file(checkpoints, tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")
    for argv, message in [
        (["export", str(tmp_path / "missing.pth"), str(tmp_path / "x.onnx")], "missing.pth: checkpoint file not found"),
        (["export", str(tmp_path / "notes.pth"), str(tmp_path / "x.onnx")], "notes.pth: not a PyTorch checkpoint"),
        (["export", str(checkpoints / "detector.pth"), str(tmp_path)], "is a folder; name the file to write"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("updetr export: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(SystemExit):
        main(["export", str(checkpoints / "detector.pth"), "--format", "tflite", str(tmp_path / "x.tflite")])
