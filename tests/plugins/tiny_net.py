"""A network of one's own, outside viscy: what a user writes to train, export, predict and serve it.

Nothing here imports viscy. ``model.name: tiny_net:TinyNet`` names it, with this folder on PYTHONPATH of
every process that builds it (the ``viscy`` commands and the Ray nodes, whose workers inherit it). It
declares no ``spec``: viscy derives it from ``in_channels``/``out_channels`` and a forward pass on the meta
device (``yx_multiple`` defaults to 1, the Z window to 1).
"""

from __future__ import annotations

from torch import Tensor, nn


class TinyNet(nn.Module):
    """Two 3x3 convolutions per image: ``(B, in_channels, 1, Y, X) -> (B, out_channels, 1, Y, X)``."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, width: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, out_channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x[:, :, 0]).unsqueeze(2)
