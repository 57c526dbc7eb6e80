"""The embedded default dataset of ``fastload bench``: its builder is the public module
``fastload.datasets`` (examples and tests import it from there); this name stays for the
harness and the scripts in benchmarks/."""
from fastload.datasets import (FORMAT_VERSION, HEIGHT, QUALITY, SKIMAGE_PHOTOS, WIDTH,  # noqa: F401
                               build_all, build_images, build_reinforced, default_cache_dir,
                               fastload_reader, list_images, make_images, make_teacher, policy,
                               render, source_photos, tiny_teacher)
