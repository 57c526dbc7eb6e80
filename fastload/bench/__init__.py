"""Benchmarks behind `fastload bench` (the scripts in benchmarks/ call these)."""
