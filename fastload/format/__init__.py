"""The reinforced format: manifest, Arrow shards, the bounded codec, the reader and writer.
Importers live in fastload.importers, token buckets in fastload.tokens, user tools in fastload.tools."""
from fastload.format.manifest import CorruptDataError  # the one error every corrupt file raises

__all__ = ["CorruptDataError"]
