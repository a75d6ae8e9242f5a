"""The networks drc_jax runs: ``unet`` (the DDPM UNet of pixel-space targets).

Each is a Flax NNX module handed to jitted code as ``(graphdef, params)``.
"""
