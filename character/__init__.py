"""character: train language models to have a chosen character (Open Character Training)."""

__version__ = "0.1.0"
