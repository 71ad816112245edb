"""The series maths, numpy only: coefficients in float64 (series.py) and a channel's interval split into pieces
(pieces.py)."""
