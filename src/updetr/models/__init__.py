"""Models: a plain table of builders."""

from .detr import DETR, MLP, build_detr
from .updetr import UPDETR, build_updetr, group_attention_mask

__all__ = ["DETR", "MLP", "UPDETR", "build_detr", "build_updetr", "group_attention_mask"]
