"""The feature networks the registry builds around a model: the layers up to the embedding.

Kept apart from :mod:`medsearch.encoders.registry` so that the registry imports torch only when it
builds a network (a query through a cached ONNX export never does), and at module level so that
they pickle by reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["DenseNetFeatures", "LiteFeatures"]


class LiteFeatures(nn.Module):
    """EfficientNet-Lite0 up to global average pooling (the classifier head is dropped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model  # the package's EfficientNet (untyped)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.model.extract_features(x)).flatten(1)


class DenseNetFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net: Any = net  # a MONAI DenseNet (features, class_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.features(x)
        for name, layer in self.net.class_layers.named_children():
            if name == "out":
                break
            x = layer(x)
        return x
