"""The dataset configs (``--config=configs/<name>.py[:variant]``), loaded by path.

Installed, this folder is the package ``drc_jax.configs`` (pyproject maps it), so a wheel carries
the same files and ``python -m drc_jax.main`` finds the embedded default from any directory.
"""
