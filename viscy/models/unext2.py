"""UNeXt2: timm ConvNeXt(-V2) encoder behind a depth-folding 3D stem, ConvNeXt decoder, pixel-to-voxel head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
from torch import Tensor, nn

from viscy.errors import ModelError
from viscy.models.blocks import DepthToChannelStem, PixelToVoxelHead, UNeXt2Decoder, stem_for_window
from viscy.models.registry import ModelSpec


class UNeXt2(nn.Module):
    """UNeXt2 virtual-staining network (VisCy-compatible state dict).

    Parameters
    ----------
    in_channels, out_channels
        Source and target channels.
    in_stack_depth
        Input Z depth; a multiple of ``stem_kernel_size[0]``.
    out_stack_depth
        Output Z depth (default: ``in_stack_depth``).
    backbone
        timm ConvNeXt-family model name; ``backbone_kwargs`` are passed to ``timm.create_model``
        (e.g. ``depths``/``dims`` for small test models).
    pretrained
        Load timm's ImageNet weights into the encoder (needs network access).
    stem_kernel_size
        (kz, ky, kx) of the patchify stem; ky must equal kx.
    decoder_mode
        ``"pixelshuffle"`` or ``"deconv"`` (transposed convolution; not weight-compatible with VisCy's).
    decoder_conv_blocks
        ConvNeXt blocks per decoder stage.
    decoder_norm_layer
        Accepted for VisCy config compatibility; the ConvNeXt decoder stages always use LayerNorm2d.
    decoder_upsample_pre_conv
        Convolution before each decoder pixel shuffle.
    head_pool
        Blur (replication pad + average pool) after the head's pixel shuffle.
    head_expansion_ratio
        Channel expansion of the head's 3D convolution.
    drop_path_rate
        Stochastic depth of the encoder.
    """

    @staticmethod
    def fit_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
        """Complete kwargs filled from the data: a stem that fits the Z window (see ``stem_for_window``)."""
        return stem_for_window(kwargs)

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        in_stack_depth: int = 5,
        out_stack_depth: int | None = None,
        backbone: str = "convnextv2_tiny",
        pretrained: bool = False,
        stem_kernel_size: Sequence[int] = (5, 4, 4),
        decoder_mode: str = "pixelshuffle",
        decoder_conv_blocks: int = 2,
        decoder_norm_layer: str = "instance",
        decoder_upsample_pre_conv: bool = False,
        head_pool: bool = False,
        head_expansion_ratio: int = 4,
        drop_path_rate: float = 0.0,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        stem_kernel_size = tuple(int(k) for k in stem_kernel_size)
        if len(stem_kernel_size) != 3 or stem_kernel_size[1] != stem_kernel_size[2]:
            raise ModelError(f"stem_kernel_size must be (kz, k, k), got {stem_kernel_size}")
        out_stack_depth = in_stack_depth if out_stack_depth is None else out_stack_depth
        try:
            encoder = timm.create_model(
                backbone,
                pretrained=pretrained,
                features_only=True,
                drop_path_rate=drop_path_rate,
                **(backbone_kwargs or {}),
            )
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ModelError(f"cannot build timm backbone {backbone!r}: {exc}") from exc
        if not hasattr(encoder, "stem_0"):
            raise ModelError(f"backbone {backbone!r} is not ConvNeXt-like (no stem_0 to replace)")
        # our 3D stem replaces the 2D patchify conv; the stem norm (stem_1) is kept
        encoder.stem_0 = nn.Identity()
        channels = encoder.feature_info.channels()
        self.stem = DepthToChannelStem(in_channels, channels[0], stem_kernel_size, in_stack_depth)
        self.encoder_stages = encoder
        head = PixelToVoxelHead(out_channels, out_stack_depth, head_expansion_ratio, pool=head_pool)
        self.decoder = UNeXt2Decoder(
            channels,
            head.in_channels,
            mode=decoder_mode,
            conv_blocks=decoder_conv_blocks,
            upsample_pre_conv=decoder_upsample_pre_conv,
            head_scale=2,
        )
        self.head = head
        self.spec = ModelSpec(
            architecture="unext2",
            in_channels=in_channels,
            out_channels=out_channels,
            z_window_size=in_stack_depth,
            out_depth=out_stack_depth,
            yx_multiple=stem_kernel_size[1] * 2 ** (len(channels) - 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, D, Y, X) -> (B, C_out, D_out, Y, X)."""
        features = self.encoder_stages(self.stem(x))
        return self.head(self.decoder(features))
