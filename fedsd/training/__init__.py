"""Training: central self-distillation, the loss, self-supervised pretraining, heads on cached features."""
