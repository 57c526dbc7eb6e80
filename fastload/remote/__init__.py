"""Remote datasets: object-store client, shard cache folder (leases, reservations, the
node-wide table), eviction policy, predownload threads. ``fastload.format.remote`` re-exports
the public names; the rules are described there."""
from .cache import (META_COLUMNS, ShardCache, materialize_decomposed, open_reinforced,  # noqa: F401
                    predownload_rows)
from .client import (SCHEMES, CacheFullError, ChecksumError, Client, RangedFile, RemoteError,  # noqa: F401
                     default_cache_dir, is_remote)
from .plan import shards_per_step  # noqa: F401
from .prefetch import PREDOWNLOAD_STREAMS  # noqa: F401
