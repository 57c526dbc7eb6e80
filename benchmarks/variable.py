"""Variable-resolution batching benchmark: sampler overhead, curriculum compute, loader speed.

    python benchmarks/variable.py [--quick]      (same as: fastload bench --variable)
"""
import sys

from fastload.bench.variable import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
