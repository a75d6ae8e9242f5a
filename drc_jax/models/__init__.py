"""The networks drc_jax runs: ``unet`` (the DDPM UNet of pixel-space targets), ``facenet``
(InceptionResnetV1 face embeddings, an encoder family) and ``mtcnn`` (the face detector's networks,
run by ``drc_jax.faces``).

Each is a Flax NNX module handed to jitted code as ``(graphdef, params)``.
"""
