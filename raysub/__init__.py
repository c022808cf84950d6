"""raysub: train neural networks in tiny subspaces, at cluster scale, on Ray."""

__version__ = "0.1.0"
