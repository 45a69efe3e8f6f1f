"""LightningModule for virtual staining and FCMAE pre-training."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanMetric, PearsonCorrCoef
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.image import StructuralSimilarityIndexMeasure

from viscy.train.config import SEGMENTATION_SCORES, TrainerConfig
from viscy.train.loss import MixedLoss

METRICS = ("pearson", "ssim", "psnr", "mae")


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """Lightning precision valid on this hardware; GPU-only settings fall back on CPU with a warning."""
    gpu = use_gpu and torch.cuda.is_available()
    if use_gpu and not gpu:
        warnings.warn("trainer.use_gpu is true but no CUDA device is visible; training on CPU", stacklevel=2)
    if precision == "16-mixed" and not gpu:
        warnings.warn("precision 16-mixed needs a GPU; using 32 on CPU", stacklevel=2)
        return "32"
    if precision == "bf16-mixed" and gpu and not torch.cuda.is_bf16_supported():
        warnings.warn("this GPU does not support bf16; using 16-mixed", stacklevel=2)
        return "16-mixed"
    return precision


def build_model(name: str, kwargs: dict[str, Any], checkpoint: str | Path | None, trainer: TrainerConfig) -> nn.Module:
    """Create the network; FCMAE gets its pre-training mode from ``trainer.fcmae`` and optional encoder weights."""
    from viscy.models import create_model, training_kwargs

    kwargs = training_kwargs(name, kwargs, trainer.fcmae.pretraining, trainer.fcmae.mask_ratio)
    model = create_model(name, checkpoint=checkpoint, **kwargs)
    if trainer.fcmae.encoder_checkpoint is not None:
        from viscy.models.fcmae import transfer_encoder_weights

        transfer_encoder_weights(trainer.fcmae.encoder_checkpoint, model)
    return model


def make_figure(source: Tensor, target: Tensor, pred: Tensor, source_names: list[str], target_names: list[str]):
    """Input / target / prediction grid (centre Z slice, up to 3 samples) as a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mid(x: Tensor) -> np.ndarray:
        return x[:, :, x.shape[2] // 2].detach().float().cpu().numpy()

    src, tgt, prd = mid(source), mid(target), mid(pred)
    n = min(3, src.shape[0])
    cols = [(f"{c} (input)", src, i) for i, c in enumerate(source_names)]
    for i, c in enumerate(target_names):
        cols += [(f"{c} target", tgt, i), (f"{c} prediction", prd, i)]
    fig, axes = plt.subplots(n, len(cols), figsize=(2.2 * len(cols), 2.2 * n), squeeze=False)
    for r in range(n):
        for k, (title, arr, ch) in enumerate(cols):
            ax = axes[r, k]
            img = arr[r, ch]
            lo, hi = np.percentile(img, (1, 99.5))
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


class VSModule(pl.LightningModule):
    """Virtual staining (MixedLoss) or FCMAE pre-training (masked MSE on the source) of one network.

    Parameters
    ----------
    model_name, model_kwargs, model_checkpoint
        The network (``viscy.models.create_model``).
    source_channels, target_channels
        Channel names; metrics are logged per target channel as ``val_<metric>_<channel>`` (and
        ``val_ap50_<channel>``, ``val_f1_<channel>`` for channels ``trainer.val_segmentation`` scores).
    trainer
        The ``trainer`` config section (as a dict, so hyper-parameters serialise).
    figure_dir
        Where input/target/prediction PNGs go (rank 0 only); None disables them.
    """

    def __init__(
        self,
        model_name: str,
        model_kwargs: dict[str, Any],
        source_channels: list[str],
        target_channels: list[str],
        trainer: dict[str, Any],
        model_checkpoint: str | None = None,
        figure_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = TrainerConfig.model_validate(trainer)
        self.model = build_model(model_name, model_kwargs, model_checkpoint, self.cfg)
        self.pretraining = self.cfg.fcmae.pretraining
        self.source_channels = list(source_channels)
        # Pre-training reconstructs the source, so its metrics are per source channel.
        self.channels = list(source_channels) if self.pretraining else list(target_channels)
        self.loss = MixedLoss(self.cfg.l1_alpha, self.cfg.l2_alpha, self.cfg.ms_dssim_alpha)
        self.figure_dir = Path(figure_dir) if figure_dir else None
        self.metrics = nn.ModuleDict()
        for ch in self.channels:
            self.metrics[f"pearson_{ch}"] = PearsonCorrCoef()
            self.metrics[f"ssim_{ch}"] = StructuralSimilarityIndexMeasure(data_range=None)
            # Normalised targets have no fixed range: PSNR per batch with the target's range, averaged.
            self.metrics[f"psnr_{ch}"] = MeanMetric()
            self.metrics[f"mae_{ch}"] = MeanAbsoluteError()
        self.scorer = None
        if self.cfg.val_segmentation.channels and not self.pretraining:
            from viscy.train.val_segmentation import InstanceMatchScore, ValSegmentationScorer

            self.scorer = ValSegmentationScorer(self.cfg.val_segmentation, self.channels)
            for ch in self.cfg.val_segmentation.channels:
                for score in SEGMENTATION_SCORES:
                    self.metrics[f"{score}_{ch}"] = InstanceMatchScore(score)
        self._figure_batch: tuple[Tensor, Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, tuple) else out

    def _step(self, batch: dict[str, Tensor], validation: bool) -> tuple[Tensor, Tensor, Tensor]:
        source, target = batch["source"], batch["target"]
        if self.pretraining:
            ratio = self.cfg.fcmae.mask_ratio if validation else None
            pred, mask = self.model(source, mask_ratio=ratio)
            from viscy.models.fcmae import masked_mse_loss

            with torch.autocast(device_type=pred.device.type, enabled=False):
                loss = masked_mse_loss(pred.float(), source.float(), mask)
            return loss, pred, source
        pred = self.model(source)
        if pred.shape != target.shape:
            raise RuntimeError(
                f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ; check data.target_2d "
                "and the model's output depth"
            )
        return self.loss(pred, target), pred, target

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _, _ = self._step(batch, validation=False)
        bs = batch["source"].shape[0]
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=bs)
        self.log("train_loss_step", loss, on_step=True, on_epoch=False, batch_size=bs)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, pred, target = self._step(batch, validation=True)
        bs = batch["source"].shape[0]
        self.log("val_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=bs)
        pred, target = pred.detach().float(), target.float()
        for i, ch in enumerate(self.channels):
            p, t = pred[:, i].contiguous(), target[:, i].contiguous()
            y, x = p.shape[-2:]
            self.metrics[f"pearson_{ch}"].update(p.reshape(-1), t.reshape(-1))
            self.metrics[f"ssim_{ch}"].update(p.reshape(-1, 1, y, x), t.reshape(-1, 1, y, x))
            rng = (t.amax() - t.amin()).clamp_min(1e-6)
            self.metrics[f"psnr_{ch}"].update(peak_signal_noise_ratio(p, t, data_range=rng), weight=p.shape[0])
            self.metrics[f"mae_{ch}"].update(p, t)
            for m in METRICS:
                self.log(f"val_{m}_{ch}", self.metrics[f"{m}_{ch}"], on_step=False, on_epoch=True, batch_size=bs)
        if self.scorer is not None:
            for ch, counts in self.scorer.counts(pred, target, batch.get("labels")).items():
                for score in SEGMENTATION_SCORES:
                    metric = self.metrics[f"{score}_{ch}"]
                    metric.update(*counts)
                    self.log(f"val_{score}_{ch}", metric, on_step=False, on_epoch=True, batch_size=bs)
        if batch_idx == 0 and self.global_rank == 0:
            self._figure_batch = (batch["source"][:3].cpu(), target[:3].cpu(), pred[:3].cpu())

    def on_validation_epoch_end(self) -> None:
        epoch = self.current_epoch
        last = self.trainer is not None and epoch + 1 >= self.trainer.max_epochs
        if self._figure_batch is None or not (epoch % self.cfg.log_every_n_epochs == 0 or last):
            return
        if self.global_rank == 0 and not self.trainer.sanity_checking:
            self._write_figure(epoch)
        self._figure_batch = None

    def _write_figure(self, epoch: int) -> None:
        import matplotlib.pyplot as plt

        source, target, pred = self._figure_batch
        fig = make_figure(source, target, pred, self.source_channels, self.channels)
        if self.figure_dir is not None:
            self.figure_dir.mkdir(parents=True, exist_ok=True)
            fig.savefig(self.figure_dir / f"epoch_{epoch:04d}.png", dpi=80)
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure("val_samples", fig, global_step=epoch)
            elif hasattr(logger, "log_image"):
                logger.log_image("val_samples", images=[fig], step=self.global_step)
        plt.close(fig)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if self.cfg.schedule == "Constant":
            return opt
        from monai.optimizers import WarmupCosineSchedule

        sched = WarmupCosineSchedule(
            opt, warmup_steps=self.cfg.warmup_epochs, t_total=self.cfg.max_epochs, warmup_multiplier=1e-3
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class ThroughputCallback(pl.Callback):
    """Logs ``train_samples_per_s`` (all workers) per epoch, excluding the first batch (pipeline start-up).

    Put it before ``RayTrainReportCallback`` so the value is part of the epoch's report.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start: float | None = None
        self._end = 0.0
        self._samples = 0

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if batch_idx == 1:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx >= 1:
            self._samples += batch["source"].shape[0]
            self._end = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is not None and self._end > self._start:
            rate = self._samples * trainer.world_size / (self._end - self._start)
            pl_module.log("train_samples_per_s", rate, on_step=False, on_epoch=True)
