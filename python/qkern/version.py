"""The qkern version (its own module so that any module can import it without a circle)."""

__version__ = "0.1.0"
