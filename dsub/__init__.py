"""dsub: distributed particle subtraction for cryo-EM."""

__version__ = "0.1.0"
