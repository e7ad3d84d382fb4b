"""Measured speed: bench (batch sizes, threads, the machine record) and the per-stage timing profile."""
