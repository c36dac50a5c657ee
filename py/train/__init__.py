"""Training: the shared denoising-loss core, augmentation, LoRA, and the Face0 data and trainer."""
