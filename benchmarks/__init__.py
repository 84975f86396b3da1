"""Benchmarks: fvtransform side by side with its peers (run ``python -m benchmarks``)."""
