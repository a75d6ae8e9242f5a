from drc_jax.target import load_target
