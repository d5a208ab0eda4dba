"""Benchmarks (make bench): each stage against its peer and its ceiling, side by side in one run."""
