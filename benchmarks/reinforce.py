"""Reinforced-format benchmark: generation throughput, bytes per augmentation, Arrow IPC vs
Parquet random access. Writes benchmarks/results/reinforce.json."""
import sys

from fastload.bench.reinforce import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
