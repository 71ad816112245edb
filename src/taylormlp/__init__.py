"""taylormlp: release language models as TaylorMLP series parameters instead of plain weights."""

__version__ = "0.1.0"
