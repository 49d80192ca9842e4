"""One training epoch (``updetr.engine.epoch``): a NaN or infinite step never changes a weight."""

import pytest
import torch

from updetr.presets import make_config
from updetr.engine import epoch as E
from updetr.engine.detection import DetectionTask
from updetr.engine.distributed import DistInfo
from updetr.engine.loop import TrainingStopped, fit


def train(tiny, data, out, *extra):
    """A detection run of one step an epoch (CNN frozen) on the embedded benchmark in ``data``."""
    layout = [f'data.root="{data}"', 'data.train_images="train"', 'data.val_images="val"',
              'data.train_annotations="annotations/instances_train.json"',
              'data.val_annotations="annotations/instances_val.json"']
    fast = ["max_steps_per_epoch=1", "eval_every=1", "optim.lr_backbone=0"]
    cfg = make_config("small", overrides=tiny + layout + fast + [f'output_dir="{out}"', *extra])
    return fit(DetectionTask(cfg), cfg, DistInfo(), progress=False)


@pytest.mark.slow
def test_non_finite_outputs_and_gradients_never_reach_the_weights(embedded, tiny_overrides, tmp_path, monkeypatch):
    real = E._float_output

    def nan_boxes(output):
        out = real(output)
        out.boxes_cxcywh = out.boxes_cxcywh * float("nan")
        return out

    with monkeypatch.context() as m:
        m.setattr(E, "_float_output", nan_boxes)  # what blown-up weights give: the matcher could not run on it
        with pytest.raises(TrainingStopped, match=r"the model output is not finite at epoch 0 step 0 .*nothing was saved"):
            train(tiny_overrides, embedded, tmp_path / "a", "optim.epochs=1")
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(E.torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: real_clip(params, max_norm) * float("inf"))
    with pytest.raises(TrainingStopped, match=r"the gradient norm is inf at epoch 0 step 0 .*no epoch had finished"):
        train(tiny_overrides, embedded, tmp_path / "b", "optim.epochs=1")
