"""Training with Ray Train + Lightning: loss, LightningModule, Ray Data patch source and the trainer."""
