"""Benchmarks: the patched server against upstream's, side by side in one run."""
