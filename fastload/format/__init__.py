"""On-disk formats: reinforced datasets (manifest + Arrow shards) and decomposed token buckets."""
