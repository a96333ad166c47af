"""Benchmarks and the honest baselines they are measured against."""
