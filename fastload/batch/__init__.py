"""Batch samplers: index sharding, variable resolution, sequence-length buckets."""
