"""Small convolutional classifier for 1x28x28 images (MNIST digits by default)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class CNNConfig:
    in_channels: int = 1  # grayscale input
    image_size: int = 28  # square inputs; the head size is derived from it
    num_classes: int = 10  # digits 0-9
    channels: tuple[int, int] = (32, 64)  # feature maps of the two conv blocks
    hidden: int = 128  # width of the fully connected layer
    dropout: float = 0.25  # before the classifier; MNIST-5k overfits without it


class CNNClassifier(nn.Module):
    config_cls = CNNConfig

    def __init__(self, config: CNNConfig):
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        self.features = nn.Sequential(
            nn.Conv2d(config.in_channels, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14 -> 7
        )
        side = config.image_size // 4
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> logits (B, num_classes)
        return self.head(self.features(x))
