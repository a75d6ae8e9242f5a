"""The networks drc_jax runs: ``unet`` (the DDPM UNet of pixel-space targets, and of latent ones
on latents), ``vq`` (the VQ autoencoder of latent diffusion targets), ``facenet``
(InceptionResnetV1 face embeddings, an encoder family) and ``mtcnn`` (the face detector's networks,
run by ``drc_jax.drc.faces``).

Each is a Flax NNX module handed to jitted code as ``(graphdef, params)``.
"""
