"""Degrade, Restore, Compare: degraders (masks, linear operators), restorers (RePaint, DDIM
inpainting, DDNM), comparators, saliency and face masks, and the DRC scorer built from them.
Every piece is a factory returning pure functions; the programs that run them jit them once."""
