"""Fully convolutional masked auto-encoder (FCMAE): ConvNeXt-V2 pre-training and the same net fine-tuned.

Masking follows ConvNeXt-V2's dense emulation of sparse convolution: a random patch mask at the
deepest encoder resolution is up-sampled to every stage and masked positions are zeroed before and
after each block, so no information leaks from masked patches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, GlobalResponseNormMlp, LayerNorm2d
from timm.models.convnext import _init_weights
from torch import Tensor, nn

from viscy.errors import ModelError
from viscy.models.blocks import PixelToVoxelShuffleHead, UNeXt2Decoder, fold_depth, stem_for_window
from viscy.models.registry import ModelSpec


def generate_mask(batch: int, grid: tuple[int, int], ratio: float, device: torch.device | None = None) -> Tensor:
    """Random patch mask of shape (B, 1, gy, gx); 1 marks a masked patch, exactly ``ratio`` of them."""
    gy, gx = grid
    n = gy * gx
    n_masked = int(round(n * ratio))
    noise = torch.rand(batch, n, device=device)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return (rank < n_masked).float().reshape(batch, 1, gy, gx)


def upsample_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest up-sampling of a (B, 1, gy, gx) mask to ``size`` (Y, X)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=tuple(size), mode="nearest")


def masked_mse_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked pixels of the channel-averaged squared error.

    Parameters
    ----------
    pred, target
        (B, C, Z, Y, X) tensors.
    mask
        Broadcastable to (B, 1, Z, Y, X); 1 marks masked (reconstructed) pixels.
    """
    mse = (pred - target).pow(2).mean(dim=1, keepdim=True)
    mask = mask.to(mse.dtype).expand_as(mse)
    return (mse * mask).sum() / mask.sum().clamp_min(1.0)


class FCMAEStem(nn.Module):
    """Patchify stem: ``conv3d`` folds depth into channels; single slices (Z = 1) go through ``conv2d``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int], in_stack_depth: int):
        super().__init__()
        kz, ky, kx = (int(k) for k in kernel_size)
        if in_stack_depth % kz:
            raise ModelError(f"in_stack_depth {in_stack_depth} is not a multiple of stem depth kernel {kz}")
        folded = in_stack_depth // kz
        if out_channels % folded:
            raise ModelError(f"dims[0]={out_channels} not divisible by folded depth {folded}")
        self.conv3d = nn.Conv3d(in_channels, out_channels // folded, (kz, ky, kx), stride=(kz, ky, kx))
        self.conv2d = nn.Conv2d(in_channels, out_channels, (ky, kx), stride=(ky, kx))
        self.norm = LayerNorm2d(out_channels, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 5 and x.shape[2] > 1:
            x = fold_depth(self.conv3d(x))
        else:
            x = self.conv2d(x[:, :, 0] if x.ndim == 5 else x)
        return self.norm(x)


class MaskedConvNeXtV2Block(nn.Module):
    """ConvNeXt-V2 block (7x7 depthwise conv, LayerNorm, GRN MLP) that honours a patch mask.

    With ``keep`` (1 = visible), masked positions are zero in the block's input, residual and output,
    and the GRN statistics are computed over visible positions only, which is what a sparse
    convolution over the visible patches would give.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, kernel_size: int = 7) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=False)
        self.layernorm = nn.LayerNorm(dim)
        self.mlp = GlobalResponseNormMlp(dim, 4 * dim, use_conv=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        if keep is None:
            y = self.dwconv(x).permute(0, 2, 3, 1)
            y = self.mlp(self.layernorm(y))
        else:
            x = x * keep
            y = (self.dwconv(x) * keep).permute(0, 2, 3, 1)
            keep_cl = keep.permute(0, 2, 3, 1)
            mlp = self.mlp
            h = mlp.drop1(mlp.act(mlp.fc1(self.layernorm(y)))) * keep_cl
            y = mlp.drop2(mlp.fc2(mlp.grn(h))) * keep_cl
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class MaskedStage(nn.Module):
    """Optional 2x down-sampling (LayerNorm2d + 2x2 conv) followed by masked ConvNeXt-V2 blocks."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, drop_paths: Sequence[float], downsample: bool):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(LayerNorm2d(in_dim), nn.Conv2d(in_dim, out_dim, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.ModuleList(MaskedConvNeXtV2Block(out_dim, dp) for dp in drop_paths[:depth])

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.downsample(x)
        keep = None if mask is None else 1.0 - upsample_mask(mask, x.shape[-2:])
        for block in self.blocks:
            x = block(x, keep)
        return x


class MaskedConvNeXtV2Encoder(nn.Module):
    """FCMAE encoder: :class:`FCMAEStem` then ConvNeXt-V2 stages; returns the multi-scale features."""

    def __init__(
        self,
        in_channels: int,
        stage_blocks: Sequence[int],
        dims: Sequence[int],
        drop_path_rate: float,
        stem_kernel_size: Sequence[int],
        in_stack_depth: int,
    ) -> None:
        super().__init__()
        self.stem = FCMAEStem(in_channels, dims[0], stem_kernel_size, in_stack_depth)
        stages, prev = [], dims[0]
        for i, (depth, dim) in enumerate(zip(stage_blocks, dims, strict=True)):
            # one rate for every block, as in VisCy (not timm's linear ramp)
            stages.append(MaskedStage(prev, dim, depth, [drop_path_rate] * depth, downsample=i > 0))
            prev = dim
        self.stages = nn.ModuleList(stages)
        self.apply(_init_weights)  # truncated normal (std 0.02) for convs and linears, as ConvNeXt

    def forward(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        x = self.stem(x)
        if mask is not None:
            x = x * (1.0 - upsample_mask(mask, x.shape[-2:]))
        features = []
        for stage in self.stages:
            x = stage(x, mask)
            features.append(x)
        return features


class FullyConvolutionalMAE(nn.Module):
    """FCMAE network (VisCy-compatible state dict): masked pre-training or fine-tuning.

    Parameters
    ----------
    in_channels, out_channels
        Source and target channels (pre-training usually reconstructs the source: equal counts).
    encoder_blocks, dims
        Blocks and channels per encoder stage.
    encoder_drop_path_rate
        Stochastic depth of every encoder block.
    stem_kernel_size
        (kz, k, k) patchify kernel.
    in_stack_depth, out_stack_depth
        Input and output Z depth (output defaults to input).
    decoder_conv_blocks
        ConvNeXt blocks per decoder stage.
    pretraining
        If True, ``forward`` returns ``(prediction, mask)`` and masks ``mask_ratio`` of the patches
        while training.
    mask_ratio
        Fraction of patches masked during pre-training (VisCy's ``fit_mask_ratio``).
    """

    @staticmethod
    def fit_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
        """Complete kwargs filled from the data: a stem that fits the Z window (see ``stem_for_window``)."""
        return stem_for_window(kwargs)

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        encoder_blocks: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        encoder_drop_path_rate: float = 0.0,
        stem_kernel_size: Sequence[int] = (5, 4, 4),
        in_stack_depth: int = 5,
        out_stack_depth: int | None = None,
        decoder_conv_blocks: int = 1,
        pretraining: bool = True,
        mask_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        stem_kernel_size = tuple(int(k) for k in stem_kernel_size)
        if len(stem_kernel_size) != 3 or stem_kernel_size[1] != stem_kernel_size[2]:
            raise ModelError(f"stem_kernel_size must be (kz, k, k), got {stem_kernel_size}")
        if len(encoder_blocks) != len(dims):
            raise ModelError(f"encoder_blocks {list(encoder_blocks)} and dims {list(dims)} differ in length")
        if not 0.0 <= mask_ratio < 1.0:
            raise ModelError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        out_stack_depth = in_stack_depth if out_stack_depth is None else out_stack_depth
        self.pretraining = pretraining
        self.mask_ratio = mask_ratio
        self.encoder = MaskedConvNeXtV2Encoder(
            in_channels, encoder_blocks, dims, encoder_drop_path_rate, stem_kernel_size, in_stack_depth
        )
        self.head = PixelToVoxelShuffleHead(out_channels, out_stack_depth, stem_kernel_size[1])
        self.decoder = UNeXt2Decoder(
            dims, self.head.in_channels, conv_blocks=decoder_conv_blocks, head_scale=stem_kernel_size[1]
        )
        self.grid_factor = stem_kernel_size[1] * 2 ** (len(dims) - 1)
        self.spec = ModelSpec(
            architecture="fcmae",
            in_channels=in_channels,
            out_channels=out_channels,
            z_window_size=in_stack_depth,
            out_depth=out_stack_depth,
            yx_multiple=self.grid_factor,
        )

    def forward(self, x: Tensor, mask_ratio: float | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Predict; in pre-training mode also return the full-resolution mask (B, 1, 1, Y, X).

        ``mask_ratio`` defaults to ``self.mask_ratio`` when pre-training in train mode, else 0.
        """
        if mask_ratio is None:
            mask_ratio = self.mask_ratio if (self.pretraining and self.training) else 0.0
        mask = None
        if mask_ratio > 0:
            grid = (x.shape[-2] // self.grid_factor, x.shape[-1] // self.grid_factor)
            mask = generate_mask(x.shape[0], grid, mask_ratio, x.device)
        pred = self.head(self.decoder(self.encoder(x, mask)))
        if not self.pretraining:
            return pred
        if mask is None:
            full = pred.new_zeros(pred.shape[0], 1, 1, *pred.shape[-2:])
        else:
            full = upsample_mask(mask, pred.shape[-2:]).unsqueeze(2)
        return pred, full


def transfer_encoder_weights(
    source: nn.Module | Mapping[str, Tensor] | str | Path,
    target: FullyConvolutionalMAE,
    include_decoder: bool = False,
) -> list[str]:
    """Copy encoder weights from a pre-training model/state dict/checkpoint into a fine-tuning model.

    Parameters
    ----------
    source
        A model, a state dict, or a checkpoint path (plain or Lightning, keys may carry ``model.``).
    target
        The fine-tuning model; modified in place.
    include_decoder
        Also copy decoder tensors whose shapes match (the last stage usually differs).

    Returns
    -------
    list[str]
        The keys copied.
    """
    from viscy.models.checkpoint import read_state_dict

    if isinstance(source, nn.Module):
        state = source.state_dict()
    elif isinstance(source, (str, Path)):
        state = read_state_dict(source)
    else:
        state = dict(source)
    target_state = target.state_dict()
    prefixes = ("encoder.", "decoder.") if include_decoder else ("encoder.",)
    copied, bad = [], []
    for key, value in target_state.items():
        if not key.startswith(prefixes):
            continue
        if key not in state:
            if key.startswith("encoder."):
                bad.append(f"missing {key}")
            continue
        if state[key].shape != value.shape:
            if key.startswith("encoder."):
                bad.append(f"{key}: {tuple(state[key].shape)} vs {tuple(value.shape)}")
            continue
        copied.append(key)
    if bad:
        raise ModelError("encoder weights do not transfer: " + "; ".join(bad[:10]))
    with torch.no_grad():
        for key in copied:
            target_state[key].copy_(state[key])
    return copied
