"""Training: settings, model building, the loop, checkpoints and LoRA fine-tuning."""
