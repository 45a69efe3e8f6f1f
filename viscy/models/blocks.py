"""Building blocks shared by UNeXt2 and FCMAE: depth-folding stem, ConvNeXt decoder and output heads.

Module and parameter names follow VisCy's so that its published state dicts load unchanged
(``stem.conv``, ``decoder.decoder_stages.N.{upsample,conv}``, ``head.{upsample,conv,out}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import Convolution, UpSample
from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXtStage, _init_weights
from torch import Tensor, nn

from viscy.errors import ModelError


def stem_for_window(kwargs: dict[str, Any], default_kernel: Sequence[int] = (5, 4, 4)) -> dict[str, Any]:
    """``kwargs`` with a stem that fits ``in_stack_depth``: unless given, a window that the default stem depth
    does not divide is folded whole (depth 1 -> ``(1, 4, 4)``, 21 -> ``(21, 4, 4)``)."""
    depth = int(kwargs.get("in_stack_depth", 5))
    if "stem_kernel_size" in kwargs or depth % default_kernel[0] == 0:
        return kwargs
    return {**kwargs, "stem_kernel_size": [depth, *default_kernel[1:]]}


def fold_depth(x: Tensor) -> Tensor:
    """(B, C, D, H, W) -> (B, C*D, H, W), channel-major."""
    b, c, d, h, w = x.shape
    return x.reshape(b, c * d, h, w)


def unfold_depth(x: Tensor, depth: int) -> Tensor:
    """(B, C*D, H, W) -> (B, C, D, H, W), the inverse of :func:`fold_depth`."""
    b, cd, h, w = x.shape
    return x.reshape(b, cd // depth, depth, h, w)


def icnr_(weight: Tensor, scale: int, dims: int = 2) -> Tensor:
    """ICNR initialisation (Aitken et al. 2017) of a conv feeding a pixel shuffle, in place.

    Every group of ``scale**dims`` output channels that the shuffle interleaves into one channel gets
    the same kernel, so the shuffled output starts free of checkerboard artefacts.
    """
    out_channels = weight.shape[0]
    group = scale**dims
    if out_channels % group:
        return weight
    base = torch.empty(out_channels // group, *weight.shape[1:], dtype=weight.dtype)
    nn.init.kaiming_normal_(base)
    with torch.no_grad():
        weight.copy_(base.repeat_interleave(group, dim=0))
    return weight


class DepthToChannelStem(nn.Module):
    """3D patchify convolution whose output depth is folded into channels.

    Parameters
    ----------
    in_channels, out_channels
        Input channels and the 2D channels after folding (must be divisible by the folded depth).
    kernel_size
        (kz, ky, kx); kernel = stride.
    in_stack_depth
        Input Z depth; must be a multiple of kz.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int], in_stack_depth: int) -> None:
        super().__init__()
        kz = int(kernel_size[0])
        if in_stack_depth % kz:
            raise ModelError(f"in_stack_depth {in_stack_depth} is not a multiple of stem depth kernel {kz}")
        folded = in_stack_depth // kz
        if out_channels % folded:
            raise ModelError(f"stem channels {out_channels} not divisible by folded depth {folded}")
        k = tuple(int(v) for v in kernel_size)
        self.conv = nn.Conv3d(in_channels, out_channels // folded, kernel_size=k, stride=k)

    def forward(self, x: Tensor) -> Tensor:
        return fold_depth(self.conv(x))


class UpStage(nn.Module):
    """Decoder stage: 2x up-sampling, concatenation with the skip, then a ConvNeXt-V2 stage.

    ConvNeXt stages use LayerNorm2d as VisCy's do. The 1x1 projection of the ConvNeXt stage keeps timm's
    name ``downsample`` (nothing is down-sampled).
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        mode: str = "pixelshuffle",
        conv_blocks: int = 2,
        upsample_pre_conv: bool = False,
        icnr_scale: int | None = 2,
    ) -> None:
        super().__init__()
        up_channels = in_channels // 4
        if mode == "pixelshuffle":
            self.upsample = UpSample(
                2,
                in_channels,
                up_channels,
                scale_factor=2,
                mode="pixelshuffle",
                pre_conv="default" if upsample_pre_conv else None,
                apply_pad_pool=False,
            )
        elif mode == "deconv":
            self.upsample = UpSample(2, in_channels, up_channels, scale_factor=2, mode="deconv")
        else:
            raise ModelError(f"unknown decoder_mode {mode!r}; use 'pixelshuffle' or 'deconv'")
        self.conv = ConvNeXtStage(
            up_channels + skip_channels,
            out_channels,
            stride=1,
            depth=conv_blocks,
            ls_init_value=None,
            conv_mlp=True,
            use_grn=True,
            norm_layer=LayerNorm2d,
        )
        self.conv.apply(_init_weights)
        if icnr_scale and not upsample_pre_conv:
            # the next pixel shuffle (next stage or head) consumes this stage's output
            icnr_(self.conv.blocks[-1].mlp.fc2.weight, icnr_scale)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([self.upsample(x), skip], dim=1))


class UNeXt2Decoder(nn.Module):
    """Stack of :class:`UpStage` from the deepest feature map up to the shallowest skip.

    Parameters
    ----------
    channels
        Encoder channels, shallow to deep (e.g. 96, 192, 384, 768).
    out_channels
        Channels of the last stage (what the head consumes).
    head_scale
        Pixel-shuffle factor of the head, for ICNR initialisation of the last stage.
    """

    def __init__(
        self,
        channels: Sequence[int],
        out_channels: int,
        mode: str = "pixelshuffle",
        conv_blocks: int = 2,
        upsample_pre_conv: bool = False,
        head_scale: int = 2,
    ) -> None:
        super().__init__()
        rev = list(channels)[::-1]
        stages = []
        for i in range(len(rev) - 1):
            last = i == len(rev) - 2
            out = out_channels if last else rev[i + 1]
            scale = head_scale if last else 2
            stages.append(UpStage(rev[i], rev[i + 1], out, mode, conv_blocks, upsample_pre_conv, scale))
        self.decoder_stages = nn.ModuleList(stages)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        feats = list(features)[::-1]
        x = feats[0]
        for stage, skip in zip(self.decoder_stages, feats[1:], strict=True):
            x = stage(x, skip)
        return x


class PixelToVoxelHead(nn.Module):
    """UNeXt2 head: 2D pixel shuffle, unfold to D+2 slices, 3D conv trimming to D, 3D pixel shuffle.

    Input channels are ``(out_depth + 2) * out_channels * 4 * expansion_ratio``; the output is
    ``(B, out_channels, out_depth, 4H, 4W)`` relative to the decoder's resolution.
    """

    def __init__(
        self,
        out_channels: int,
        out_stack_depth: int,
        expansion_ratio: int = 4,
        pool: bool = False,
        norm: str | None = "INSTANCE",
    ) -> None:
        super().__init__()
        self.depth = out_stack_depth + 2
        voxel_channels = out_channels * expansion_ratio
        in_channels = self.depth * voxel_channels * 4
        self.in_channels = in_channels
        self.upsample = UpSample(
            2,
            in_channels,
            in_channels // 4,
            scale_factor=2,
            mode="pixelshuffle",
            pre_conv=None,
            apply_pad_pool=pool,
        )
        self.conv = nn.Sequential(
            Convolution(3, voxel_channels, voxel_channels * 4, kernel_size=3, padding=(0, 1, 1), norm=norm),
            nn.Conv3d(voxel_channels * 4, out_channels * 4, kernel_size=1),
        )
        icnr_(self.conv[1].weight, 2)
        self.out = nn.PixelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        x = unfold_depth(self.upsample(x), self.depth)
        x = self.conv(x)
        # pixel shuffle acts on the last three dims: move depth out of the way
        return self.out(x.transpose(1, 2)).transpose(1, 2)


class PixelToVoxelShuffleHead(nn.Module):
    """FCMAE head without parameters: pixel shuffle by ``scale`` (optionally blurred), unfold to depth."""

    def __init__(self, out_channels: int, out_stack_depth: int, scale: int, pool: bool = True) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.depth = out_stack_depth
        self.in_channels = out_channels * out_stack_depth * scale * scale
        self.upsample = UpSample(
            2,
            self.in_channels,
            out_channels * out_stack_depth,
            scale_factor=scale,
            mode="pixelshuffle",
            pre_conv=None,
            apply_pad_pool=pool,
        )

    def forward(self, x: Tensor) -> Tensor:
        return unfold_depth(self.upsample(x), self.depth)
