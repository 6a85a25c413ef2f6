"""Our own small PyTorch modules (TorchScript-able): BERT, CLIP text transformer, ViT, serving wrappers."""

from .bert import BertEncoder
from .clip_text import ClipTextTransformer
from .heads import ImageEncoder, TextEncoder
from .vit import VisionTransformer

__all__ = ["BertEncoder", "ClipTextTransformer", "ImageEncoder", "TextEncoder", "VisionTransformer"]
