"""Benchmarks (not tests): ``python -m bench.ingest_bench`` measures the ingest hot path."""
