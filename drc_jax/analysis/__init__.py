"""Studies of the audit rather than the audit itself: the DRC protocol sweep, the cost frontier,
AUC against training steps, speed benchmarks and exporting a trained target for shipping. One
command line: ``python -m drc_jax.analysis sweep|frontier|steps-curve|bench|export|thresholds``."""
