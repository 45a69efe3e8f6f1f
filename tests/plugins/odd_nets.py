"""Networks of one's own that exercise each way of getting (or not getting) a ModelSpec."""

from __future__ import annotations

from torch import Tensor, nn

from viscy.models import ModelSpec

NOT_A_CONSTRUCTOR = 3


class Declared(nn.Module):
    """Declares its spec as a property (the derivation is not used)."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 1)

    @property
    def spec(self) -> ModelSpec:
        c = self.conv.in_channels
        return ModelSpec(
            architecture="odd_nets:Declared", in_channels=c, out_channels=c, z_window_size=1, out_depth=1, yx_multiple=4
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Volume(nn.Module):
    """3D in, 3D out over a Z window given as ``in_stack_depth``; YX must be even (a 2x down/up-sampling)."""

    yx_multiple = 2

    def __init__(self, in_channels: int = 1, out_channels: int = 1, in_stack_depth: int = 3) -> None:
        super().__init__()
        self.down = nn.Conv3d(in_channels, 4, (1, 2, 2), stride=(1, 2, 2))
        self.up = nn.ConvTranspose3d(4, out_channels, (1, 2, 2), stride=(1, 2, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


def centre_slice(in_channels: int = 1, out_channels: int = 1, z_window_size: int = 5) -> nn.Module:
    """A function constructor: a Z window in, its centre slice out (``out_depth`` comes from the forward pass)."""
    return _Centre(in_channels, out_channels)


class _Centre(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x[:, :, x.shape[2] // 2]).unsqueeze(2)


class NoChannels(nn.Module):
    """Nothing to derive a spec from: no in_channels/out_channels arguments."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, width, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class WrongChannels(nn.Module):
    """Ignores out_channels, so the forward pass contradicts the constructor."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Needs3D(nn.Module):
    """Its forward pass needs a Z window of 4 (a 4-slice kernel) that nothing declares."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, (4, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class BadSpec(nn.Module):
    """A spec that is not a ModelSpec."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1) -> None:
        super().__init__()
        self.spec = {"in_channels": in_channels}

    def forward(self, x: Tensor) -> Tensor:
        return x


class AnyKwargs(nn.Module):
    """Takes ``**kwargs``: viscy passes any keyword argument through."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, **options: object) -> None:
        super().__init__()
        self.options = options
        self.conv = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def not_a_module(in_channels: int = 1, out_channels: int = 1) -> str:
    return "a string"
