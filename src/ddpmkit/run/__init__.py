"""A run: its typed configuration, the objects built from it, and its directory on disk.

config      the dataclasses (ModelConfig ... RunConfig), JSON, validation, resuming rules
presets     named configurations
build       config -> schedule, network, denoiser, loss, optimizer
checkpoint  the run directory: config.json, checkpoints (safetensors), atomic writes
load        opening a run: config and weights -> a Denoiser
sampling    a denoiser -> images with the run's sampling settings
"""
