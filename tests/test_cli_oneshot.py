"""`updetr oneshot train / eval / predict` end to end on a tiny embedded benchmark, and bad input."""

import json

import pytest
import torch

from updetr import cli
from updetr.config import ModelConfig, PretrainConfig
from updetr.presets import make_config
from updetr.data.embedded import EMBEDDED_LAYOUT, embedded_data_overrides
from updetr.data.embedded_sources import EMBEDDED_THING_CLASSES, ONESHOT_UNSEEN
from updetr.engine.checkpoint import save_checkpoint
from updetr.engine.inference import evaluate_one_shot
from updetr.engine.one_shot import OneShotTask
from updetr.models import build_updetr

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

TINY = ["--set", "model.backbone=resnet18", "--set", "model.hidden_dim=32", "--set", "model.num_heads=4",
        "--set", "model.enc_layers=1", "--set", "model.dec_layers=1", "--set", "model.ffn_dim=64",
        "--set", "model.num_queries=6", "--set", "pretrain.query_size=32", "--set", "data.scales=[64,80,96]",
        "--set", "data.val_size=64", "--set", "data.max_size=96", "--set", "data.crop=false",
        "--set", "data.num_workers=0"]


def run(*argv):
    return cli.main(["oneshot", *argv])


@pytest.fixture(scope="module")
def bench(embedded):
    """The session's tiny embedded benchmark (tests/conftest.py), read only here."""
    return embedded


@pytest.fixture(scope="module")
def trained(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = cli.main(["oneshot", "train", "--no-progress", "--preset", "small", "--embedded", str(bench), "--epochs", "1",
                   "--batch-size", "2", "--device", "cpu", "--output", str(out), "--draws", "2", "--freeze-backbone", *TINY])
    assert rc == 0
    return out / "checkpoint.pth"


@pytest.mark.slow
def test_train_then_eval_prints_table3_and_is_deterministic(trained, tmp_path, capsys):
    ckpt = torch.load(trained, weights_only=True)
    assert ckpt["task"] == "oneshot" and ckpt["oneshot"]["split"]["unseen"] == list(ONESHOT_UNSEEN)
    # the benchmark's split: the 10 other photographed objects are the seen (training) classes
    assert ckpt["oneshot"]["split"]["seen"] == [c for c in EMBEDDED_THING_CLASSES if c not in ONESHOT_UNSEEN]
    assert len(ckpt["oneshot"]["split"]["seen"]) == 10
    assert ckpt["config"]["oneshot"]["num_draws"] == 2 and ckpt["oneshot"]["init"] == "scratch"
    assert "val/AP50_seen" in ckpt["metrics"] and "val/AP50_unseen" in ckpt["metrics"]
    capsys.readouterr()
    assert run("eval", "--no-progress", "--checkpoint", str(trained), "--json", str(tmp_path / "a.json")) == 0
    table = capsys.readouterr().out
    assert "| UP-DETR (paper, VOC) | 69.0 | 73.1 |" in table and "| CoAE (paper, VOC) | 60.1 | 68.2 |" in table
    assert "**this checkpoint (init: scratch)**" in table and "2 query draws" in table
    first = (tmp_path / "a.json").read_text()
    result = json.loads(first)
    assert set(result) >= {"seen_AP50", "unseen_AP50", "per_class", "per_draw", "num_images", "init"}
    assert all(len(v) == 2 for v in result["per_draw"].values())
    assert result["per_class"] and set(result["per_class"]) <= set(EMBEDDED_THING_CLASSES)
    # a second evaluation, through the Python entry point, gives exactly the same result
    again = evaluate_one_shot(trained, device="cpu", batch_size=3)
    assert json.dumps(again, indent=2) + "\n" == first, "evaluation must be deterministic for a checkpoint"


@pytest.mark.slow
def test_predict_draws_every_detection(trained, bench, tmp_path):
    out = tmp_path / "pred"
    rc = run("predict", "--no-progress", "--exemplar", f"{bench}/val/000000.jpg:10,12,20,18", "--image",
             f"{bench}/val/000001.jpg", f"{bench}/val/000002.jpg", "--checkpoint", str(trained), "--output", str(out),
             "--threshold", "0")
    assert rc == 0
    payload = json.loads((out / "detections.json").read_text())
    assert payload["exemplar"]["box_xywh"] == [10.0, 12.0, 20.0, 18.0]
    assert [len(im["detections"]) for im in payload["images"]] == [6, 6]  # threshold 0: all Q queries
    scores = [d["score"] for d in payload["images"][0]["detections"]]
    assert scores == sorted(scores, reverse=True)
    assert (out / "exemplar.png").is_file() and len(list(out.glob("000*_*.png"))) == 2


@pytest.mark.slow
def test_bad_input_gives_clear_messages(trained, bench, capsys):
    image = f"{bench}/val/000001.jpg"
    common = ["--no-progress", "--image", image, "--checkpoint", str(trained), "--output", str(bench.parent / "p")]
    assert run("predict", "--exemplar", f"{bench}/val/000000.jpg:90,10,200,20", *common) == 2
    assert "000000.jpg: exemplar box x=90, y=10, w=200, h=20 is outside" in capsys.readouterr().err
    assert run("predict", "--exemplar", f"{bench}/val/000000.jpg:5,5,4,30", *common) == 2
    assert "smaller than the minimum 8x8" in capsys.readouterr().err
    assert run("predict", "--exemplar", f"{bench}/val/000000.jpg:1,2,3", *common) == 2
    assert "must be 4 numbers x,y,w,h" in capsys.readouterr().err
    assert run("eval", "--no-progress", "--checkpoint", str(trained), "--split", "unseen=zebra") == 2
    assert "'zebra', not a class" in capsys.readouterr().err
    val = json.loads((bench / "annotations" / "instances_val.json").read_text())
    names = {c["id"]: c["name"] for c in val["categories"]}
    images_of = {n: {a["image_id"] for a in val["annotations"] if names[a["category_id"]] == n} for n in names.values()}
    lonely = sorted(n for n, ids in images_of.items() if len(ids) < 2)  # no exemplar from another test image
    assert lonely, "the tiny benchmark has classes with fewer than two test images"
    assert run("eval", "--no-progress", "--checkpoint", str(trained), "--classes", lonely[0]) == 2
    assert f"exemplar class '{lonely[0]}' has no usable test instance" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_rejects_other_checkpoints_and_init_from_pretraining_keeps_patch2query(bench, tmp_path, capsys):
    model_cfg = ModelConfig(backbone="resnet18", hidden_dim=32, num_heads=4, enc_layers=1, dec_layers=1, ffn_dim=64,
                            dropout=0.0, num_queries=6, pre_norm=True)  # as the small preset
    pretrained = build_updetr(model_cfg, PretrainConfig(num_patches=3))
    save_checkpoint(tmp_path / "pre.pth", {"model": pretrained.state_dict(), "task": "pretrain"})
    assert run("eval", "--no-progress", "--checkpoint", str(tmp_path / "pre.pth")) == 2
    assert "not one from `updetr oneshot train`" in capsys.readouterr().err
    overrides = [s for s in TINY if s != "--set"] + [f"init_from={json.dumps(str(tmp_path / 'pre.pth'))}"]
    overrides += embedded_data_overrides(bench)
    cfg = make_config("small", None, overrides + ["oneshot.freeze_backbone=true"])
    task = OneShotTask(cfg)
    task.train_dataset()
    model = task.build_model()
    assert task.init_kind == "updetr-pretrain"
    assert torch.equal(model.patch2query.weight, pretrained.patch2query.weight)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone."))


def test_oracle_predictions_score_100(bench):
    """A model that returns each episode's ground-truth boxes gets AP50 100 for every evaluated class."""
    from updetr.config import DataConfig
    from updetr.data.build import build_detection_dataset
    from updetr.data.one_shot import OneShotEpisodes, collate_one_shot
    from updetr.engine.distributed import DistInfo
    from updetr.engine.loop import make_loader
    from updetr.engine.one_shot import run_one_shot_evaluation
    from updetr.structures import DetectionOutput

    data = DataConfig(root=str(bench), **EMBEDDED_LAYOUT, val_size=64, max_size=96, batch_size=3, num_workers=0)
    test = build_detection_dataset(data, "val")
    episodes = OneShotEpisodes(test, list(range(len(test.classes))), query_size=16, min_exemplar_size=8, num_draws=2)
    loader = make_loader(episodes, collate_one_shot, 3, 0, DistInfo(), train=False, seed=0)
    queue = [targets for _, targets, _ in loader for _ in range(2)]  # one forward per draw

    class Oracle(torch.nn.Module):
        def forward(self, images, patches):
            targets = queue.pop(0)
            logits = torch.tensor([-5.0, 5.0]).repeat(len(targets), 6, 1)  # (B, Q, 2): no object
            boxes = torch.full((len(targets), 6, 4), 0.5)
            for b, t in enumerate(targets):
                n = len(t["boxes_cxcywh"])
                logits[b, :n] = torch.tensor([5.0, -5.0])
                boxes[b, :n] = t["boxes_cxcywh"]  # normalised cxcywh of the eval-resized image
            return DetectionOutput(logits=logits, boxes_cxcywh=boxes)

    result = run_one_shot_evaluation(Oracle(), loader, torch.device("cpu"), list(range(len(test.classes))), [])
    evaluated = {test.classes[label] for _, label in episodes.episodes}
    assert evaluated and all(result.per_class[n] == pytest.approx(100.0) for n in evaluated)
    assert not queue
