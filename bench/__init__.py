"""Benchmarks of bridge against the raw broker clients it is built on (`python -m bench.throughput`)."""
