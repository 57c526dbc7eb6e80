"""On-disk formats: reinforced datasets (manifest + Arrow shards) and decomposed token buckets."""
from fastload.format.manifest import CorruptDataError  # the one error every corrupt file raises

__all__ = ["CorruptDataError"]
