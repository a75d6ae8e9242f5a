"""Membership attacks behind one interface (``registry.ATTACKS``): DRC and the baselines Loss,
SecMI, PIA, PIAN and SimA, each a factory returning a pure ``scores(params, keys, images)``."""
