"""Targets and encoders as loaded objects: ``load_target`` (workdirs, checkpoints, safetensors
targets, the shipped ones), orbax checkpoints and ``model.json``, the shipped targets' integrity
records, image encoders (``load_encoder``) and training a target on its member split.

The shipped targets live here as data: ``drc_jax/targets/<name>/``."""
