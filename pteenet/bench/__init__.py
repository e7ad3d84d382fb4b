"""Measured speed: bench (batch sizes, threads, the machine record, predicted against measured time; the profile itself is runtime/timing.py)."""
