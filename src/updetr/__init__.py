"""UP-DETR: unsupervised pre-training for detection transformers.

Shape notation used in every docstring and shape comment of this package:

    B   batch size                      Q   object queries (DETR's N)
    M   query patches per image         N   ground-truth targets of one image
    C   classes (without no-object)     D   transformer width (hidden dim)
    Cb  backbone output channels        L   decoder layers
    H, W  image height and width (pixels, after resizing and padding)
    h, w  feature-map height and width

Boxes are named after their format: ``boxes_cxcywh`` (normalised to [0, 1] by the
unpadded image size unless the name says ``_px``) or ``boxes_xyxy_px`` (pixels).
Padding masks are boolean with ``True`` marking a padded (invalid) pixel, as in
``torch.nn.MultiheadAttention``'s ``key_padding_mask``.
"""

__version__ = "0.1.0"


def load_official_checkpoint(path, **overrides):
    """Load a published DETR / UP-DETR ``.pth`` as an updetr model (see ``updetr.models.official``)."""
    from .models.official import load_official_checkpoint as _load

    return _load(path, **overrides)


__all__ = ["load_official_checkpoint", "__version__"]
