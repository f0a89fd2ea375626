"""moat's gateway: an Open Inference Protocol proxy that protects the models behind it."""

__version__ = "0.1.0"
