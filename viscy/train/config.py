"""Schema of ``viscy train``: the data, model, trainer and logging sections.

Validation checks values only; whether the model fits the data is checked once, on the driver, by
:func:`viscy.train.check.check_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from viscy.config import StrictModel
from viscy.data.config import DataConfig
from viscy.models.config import ModelConfig
from viscy.segment.config import SegmenterConfig


class FcmaeTrainConfig(StrictModel):
    """FCMAE pre-training (masked reconstruction of the source) or fine-tuning from a pre-trained encoder."""

    pretraining: bool = Field(False, description="Masked pre-training: reconstruct the source (model: fcmae).")
    mask_ratio: float = Field(0.5, ge=0, lt=1, description="Fraction of patches masked in pre-training.")
    encoder_checkpoint: Path | None = Field(
        None, description="Pre-trained FCMAE checkpoint whose encoder initialises the model (fine-tuning)."
    )


SEGMENTATION_SCORES = ("ap50", "f1")  # validation scores per segmented channel: val_<score>_<channel>


class ValSegmentationConfig(SegmenterConfig):
    """Segmentation scores of the validation predictions: ``val_ap50_<channel>`` and ``val_f1_<channel>``.

    Each validation patch's prediction is segmented and matched (IoU >= 0.5) against the plate's ground-truth
    label image named in ``labels``, else against the same segmentation of the target patch.
    """

    channels: list[str] = Field(
        default_factory=list,
        description="Target channels whose validation predictions are segmented and scored (AP and F1 at IoU "
        "0.5); empty: no segmentation scores.",
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Ground truth per channel: channel -> the plate's label image (e.g. Nuclei: nuclei); a channel "
        "without one is scored against the segmentation of its target.",
    )

    def label_names(self) -> tuple[str, ...]:
        """The label images validation patches carry, in the order of ``labels``, each once."""
        return tuple(dict.fromkeys(self.labels.values()))

    @model_validator(mode="after")
    def _labels_name_scored_channels(self) -> ValSegmentationConfig:
        extra = sorted(set(self.labels) - set(self.channels))
        if extra:
            raise ValueError(f"labels name channels that are not scored: {extra}; add them to channels")
        if len(set(self.channels)) != len(self.channels):
            raise ValueError(f"channels are listed twice: {self.channels}")
        return self


class TrainerConfig(StrictModel):
    """Optimisation, loss, precision, Ray Train scaling, checkpointing and fault tolerance."""

    max_epochs: int = Field(50, ge=1, description="Epochs to train (a resumed run continues up to this).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_epochs: int = Field(3, ge=0, description="Linear warm-up epochs of the WarmupCosine schedule.")
    schedule: Literal["WarmupCosine", "Constant"] = Field("WarmupCosine", description="Learning-rate schedule.")
    l1_alpha: float = Field(0.5, ge=0, description="Weight of the L1 loss.")
    l2_alpha: float = Field(0.0, ge=0, description="Weight of the L2 (MSE) loss.")
    ms_dssim_alpha: float = Field(0.5, ge=0, description="Weight of 1 - MS-SSIM (per YX slice).")
    precision: Literal["32", "bf16-mixed", "16-mixed"] = Field(
        "32", description="Lightning precision; 16-mixed falls back to 32 on CPU with a warning."
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one DDP rank each).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); false: CPU with gloo.")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs reserved per worker (leave some for Ray Data).")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs per worker when use_gpu is true.")
    placement: Literal["pack", "spread", "strict_spread"] = Field(
        "pack",
        description="Where workers go: pack (fewest nodes), spread (different nodes where possible), "
        "strict_spread (one worker per node, or wait for nodes).",
    )
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the latest checkpoint (-1: inf).")
    check_resources: bool = Field(
        True,
        description="Fail at once if the cluster cannot host the worker group (false: an autoscaling cluster "
        "will add the nodes).",
    )
    num_to_keep: int = Field(2, ge=1, description="Best checkpoints kept (by validation loss).")
    storage_path: str = Field(
        "runs",
        description="Directory or URI (s3://, gs://, file://) holding runs; on several nodes a shared filesystem "
        "or a URI.",
    )
    run_name: str | None = Field(None, description="Run name (storage_path/run_name); default: model + time.")
    resume: bool = Field(False, description="Continue the run storage_path/run_name from its last checkpoint.")
    log_every_n_epochs: int = Field(5, ge=1, description="Epochs between input/target/prediction figures.")
    fcmae: FcmaeTrainConfig = Field(default_factory=FcmaeTrainConfig)
    val_segmentation: ValSegmentationConfig = Field(default_factory=ValSegmentationConfig)
    train_steps_per_epoch: int | None = Field(
        None, ge=1, description="Batches per worker per epoch; default: reads_per_fov reads of every train FOV."
    )
    val_steps: int | None = Field(None, ge=1, description="Validation batches per worker; default: all crops.")
    reads_per_fov: int = Field(
        4, ge=1, description="Region reads per training FOV per epoch (each cuts data.patches_per_stack patches)."
    )
    val_reads_per_fov: int = Field(2, ge=1, description="Fixed region reads per validation FOV.")
    seed: int = Field(42, description="Seed of weights initialisation and validation crops.")


class LoggingConfig(StrictModel):
    """Experiment tracking: Weights & Biases when enabled, TensorBoard otherwise."""

    wandb: bool = Field(False, description="Log to W&B (Lightning WandbLogger); false: TensorBoard.")
    project: str = Field("viscy", description="W&B project.")
    group: str | None = Field(None, description="W&B group.")
    run_name: str | None = Field(None, description="W&B run name; default: the trainer's run name.")
    offline: bool = Field(True, description="W&B offline mode (sync later with `wandb sync`).")


DEFAULT_TRAIN_MODEL = "unext2"


class TrainConfig(StrictModel):
    """``viscy train``: data, model, trainer and logging sections."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _resume_names_its_run(self) -> TrainConfig:
        if self.trainer.resume and self.trainer.run_name is None:
            raise ValueError("trainer.resume needs trainer.run_name (the run to continue)")
        scored = self.trainer.val_segmentation.channels
        if scored and self.trainer.fcmae.pretraining:
            raise ValueError("trainer.val_segmentation scores stained channels; FCMAE pre-training predicts none")
        unknown = [c for c in scored if c not in self.data.target_channels]
        if unknown:
            raise ValueError(
                f"trainer.val_segmentation.channels {unknown} are not target channels; choose from "
                f"{self.data.target_channels}"
            )
        return self
