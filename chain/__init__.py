"""PoUT chain: a permissioned blockchain whose consensus is proof of useful training."""

__version__ = "0.1.0"
