"""Benchmarks behind ``ears-vllm bench``: speed and acceptance live here, never in timed tests."""
