import pytest
import torch

from updetr.evaluation.postprocess import postprocess_detections
from updetr.structures import DetectionOutput


def test_boxes_are_converted_to_original_pixels():
    # image 0: 200 x 100 (h x w), image 1: 50 x 400
    boxes = torch.tensor([
        [[0.5, 0.5, 1.0, 1.0], [0.25, 0.75, 0.1, 0.2]],
        [[0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.2, 0.4]],
    ])
    output = DetectionOutput(logits=torch.zeros(2, 2, 4), boxes_cxcywh=boxes)
    orig_sizes = torch.tensor([[200, 100], [50, 400]])

    results = postprocess_detections(output, orig_sizes)

    expected = [
        [[0.0, 0.0, 100.0, 200.0], [20.0, 130.0, 30.0, 170.0]],
        [[100.0, 12.5, 300.0, 37.5], [0.0, 0.0, 80.0, 20.0]],
    ]
    for result, boxes_px in zip(results, expected):
        assert torch.allclose(result["boxes_xyxy"], torch.tensor(boxes_px), atol=1e-4)


def test_scores_and_labels_ignore_the_no_object_column():
    logits = torch.tensor([[[1.0, 3.0, 0.0, 10.0], [2.0, 0.0, 0.0, -5.0]]])  # C = 3
    output = DetectionOutput(logits=logits, boxes_cxcywh=torch.full((1, 2, 4), 0.5))

    (result,) = postprocess_detections(output, torch.tensor([[10, 10]]))

    prob = logits.softmax(-1)[0]
    assert result["labels"].tolist() == [1, 0]  # query 0 is mostly no-object, still labelled 1
    assert result["scores"].tolist() == pytest.approx([prob[0, 1].item(), prob[1, 0].item()])
    assert result["labels"].dtype == torch.int64


def test_score_threshold_and_top_k():
    logits = torch.log(torch.tensor([[[0.1, 0.9, 0.0], [0.6, 0.1, 0.3], [0.2, 0.3, 0.5], [0.05, 0.05, 0.9]]]))
    boxes = torch.rand(1, 4, 4) * 0.5 + 0.25
    output = DetectionOutput(logits=logits, boxes_cxcywh=boxes)
    sizes = torch.tensor([[100, 100]])

    (all_queries,) = postprocess_detections(output, sizes)
    assert all_queries["scores"].tolist() == pytest.approx([0.9, 0.6, 0.3, 0.05])

    (thresholded,) = postprocess_detections(output, sizes, score_threshold=0.5)
    assert thresholded["scores"].tolist() == pytest.approx([0.9, 0.6])
    assert torch.equal(thresholded["boxes_xyxy"], all_queries["boxes_xyxy"][:2])

    (top,) = postprocess_detections(output, sizes, top_k=3)
    assert top["scores"].tolist() == pytest.approx([0.9, 0.6, 0.3])
    assert top["labels"].tolist() == [1, 0, 1]
