"""gqa-lut: quantization-aware piecewise-linear look-up tables for integer hardware."""
__version__ = "0.2.0"
