"""Protecting a model: options, calibration, the per-layer plan (protector), the coverage search, the slowdown dial
(throttle), the pre-flight, and the one protect flow (flow.py) they make up."""
