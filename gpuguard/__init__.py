"""gpuguard: a node-local GPU health daemon and training supervisor."""

__version__ = "0.1.0"
