"""The networks drc_jax runs: ``unet`` (the DDPM UNet of pixel-space targets, and of latent ones
on latents) and ``vq`` (the VQ autoencoder of latent diffusion targets).

Each is a Flax NNX module handed to jitted code as ``(graphdef, params)``.
"""
