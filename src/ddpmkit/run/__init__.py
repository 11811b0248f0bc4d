"""A run: its typed configuration, the objects built from it, and its directory on disk.

config      the dataclasses (ModelConfig ... RunConfig), JSON, validation, resuming rules
presets     named configurations
build       config -> schedule, network, denoiser, loss, optimizer
checkpoint  the run directory: config.json, checkpoints (safetensors), atomic writes, bounded reads
weights     a safetensors file as untrusted input: its header checked against a network, then loaded
load        opening a run (untrusted input): config and weights checked, then a Denoiser
sampling    a denoiser -> images with the run's sampling settings
"""
