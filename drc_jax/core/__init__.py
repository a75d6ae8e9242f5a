"""The foundation every other layer imports: noise schedules, random streams, the device mesh,
errors, atomic file I/O, progress logging and the config base. Imports nothing else of drc_jax."""
