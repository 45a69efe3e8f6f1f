"""Classic U-Nets on MONAI blocks: 2D, 2.5D (3D encoder, 2D decoder for the centre slice) and 3D."""

from __future__ import annotations

from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from monai.networks.nets import DynUNet
from torch import Tensor, nn

from viscy.errors import ModelError
from viscy.models.registry import ModelSpec

_NORM = ("INSTANCE", {"affine": True})
_ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


def _filters(base: int, levels: int, cap: int = 512) -> list[int]:
    return [min(base * 2**i, cap) for i in range(levels)]


class UNet2D(nn.Module):
    """2D U-Net (MONAI DynUNet) behind the common 5D interface; Z must be 1.

    Parameters
    ----------
    in_channels, out_channels
        Source and target channels.
    num_blocks
        Number of 2x down-samplings; Y and X must be multiples of ``2**num_blocks``.
    num_filters
        Channels of the first level (doubled at each level, capped at 512).
    dropout
        Dropout inside the convolution blocks.
    in_stack_depth
        Accepted for interface uniformity; must be 1.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        num_blocks: int = 4,
        num_filters: int = 32,
        dropout: float | None = None,
        in_stack_depth: int = 1,
    ) -> None:
        super().__init__()
        if in_stack_depth != 1:
            raise ModelError(f"unet2d takes one Z slice, got in_stack_depth={in_stack_depth}; use unet25d")
        strides = [1] + [2] * num_blocks
        self.net = DynUNet(
            2,
            in_channels,
            out_channels,
            kernel_size=[3] * (num_blocks + 1),
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=_filters(num_filters, num_blocks + 1),
            dropout=dropout,
            norm_name=_NORM,
            act_name=_ACT,
        )
        self.spec = ModelSpec("unet2d", in_channels, out_channels, 1, 1, 2**num_blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x[:, :, 0]).unsqueeze(2)


class UNet25D(nn.Module):
    """2.5D U-Net: 3D encoder over a Z window, skips collapsed over Z, 2D decoder for the centre slice.

    Parameters
    ----------
    in_channels, out_channels
        Source and target channels.
    in_stack_depth
        Z window of the input; the output is one slice (its centre).
    num_blocks
        Number of YX 2x down-samplings (Z is never down-sampled).
    num_filters
        Channels of the first level (doubled at each level, capped at 512).
    dropout
        Dropout inside the convolution blocks.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        in_stack_depth: int = 5,
        num_blocks: int = 4,
        num_filters: int = 16,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        if in_stack_depth < 1:
            raise ModelError(f"in_stack_depth must be >= 1, got {in_stack_depth}")
        filters = _filters(num_filters, num_blocks + 1)
        self.encoder = nn.ModuleList()
        self.skips = nn.ModuleList()
        prev = in_channels
        for i, f in enumerate(filters):
            self.encoder.append(
                UnetBasicBlock(
                    3,
                    prev,
                    f,
                    kernel_size=3,
                    stride=(1, 2, 2) if i else 1,
                    norm_name=_NORM,
                    act_name=_ACT,
                    dropout=dropout,
                )
            )
            # a (Z, 1, 1) valid convolution collapses the window into one 2D feature map
            self.skips.append(nn.Conv3d(f, f, kernel_size=(in_stack_depth, 1, 1)))
            prev = f
        self.decoder = nn.ModuleList(
            UnetUpBlock(
                2,
                filters[i + 1],
                filters[i],
                kernel_size=3,
                stride=1,
                upsample_kernel_size=2,
                norm_name=_NORM,
                act_name=_ACT,
                dropout=dropout,
            )
            for i in reversed(range(num_blocks))
        )
        self.out = UnetOutBlock(2, filters[0], out_channels)
        self.spec = ModelSpec("unet25d", in_channels, out_channels, in_stack_depth, 1, 2**num_blocks)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for block, proj in zip(self.encoder, self.skips, strict=True):
            x = block(x)
            skips.append(proj(x)[:, :, 0])
        y = skips[-1]
        for up, skip in zip(self.decoder, reversed(skips[:-1]), strict=True):
            y = up(y, skip)
        return self.out(y).unsqueeze(2)


class UNet3D(nn.Module):
    """Anisotropic 3D U-Net (MONAI DynUNet), FNet-like: YX halves at every level, Z only at the deep ones.

    Parameters
    ----------
    in_channels, out_channels
        Source and target channels.
    in_stack_depth
        Input (and output) Z depth; a multiple of ``2**z_downsample``.
    num_blocks
        Number of YX 2x down-samplings.
    z_downsample
        How many of the deepest levels also halve Z (default: as many as ``in_stack_depth`` allows,
        at most ``num_blocks // 2``).
    num_filters
        Channels of the first level (doubled at each level, capped at 512).
    dropout
        Dropout inside the convolution blocks.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        in_stack_depth: int = 8,
        num_blocks: int = 4,
        z_downsample: int | None = None,
        num_filters: int = 32,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        if z_downsample is None:
            z_downsample = 0
            while z_downsample < num_blocks // 2 and in_stack_depth % 2 ** (z_downsample + 1) == 0:
                z_downsample += 1
        if not 0 <= z_downsample <= num_blocks or in_stack_depth % 2**z_downsample:
            raise ModelError(
                f"unet3d: in_stack_depth {in_stack_depth} must be a multiple of 2**z_downsample "
                f"({z_downsample=}, {num_blocks=})"
            )
        strides: list[tuple[int, int, int]] = [(1, 1, 1)]
        kernels: list[tuple[int, int, int]] = []
        depth = in_stack_depth
        for level in range(num_blocks):
            sz = 2 if level >= num_blocks - z_downsample else 1
            strides.append((sz, 2, 2))
        for level in range(num_blocks + 1):
            depth //= strides[level][0]
            kernels.append((3 if depth > 1 else 1, 3, 3))
        self.net = DynUNet(
            3,
            in_channels,
            out_channels,
            kernel_size=kernels,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=_filters(num_filters, num_blocks + 1),
            dropout=dropout,
            norm_name=_NORM,
            act_name=_ACT,
        )
        self.spec = ModelSpec("unet3d", in_channels, out_channels, in_stack_depth, in_stack_depth, 2**num_blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
