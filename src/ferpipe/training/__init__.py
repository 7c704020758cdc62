"""Training: augmentation, the training loop, DVCLive logging, data-parallel processes and
self-training. Imports data, model and the base modules."""
