"""The fused replay kernel alone vs per-image torch tensor ops (see fastload/bench/kernel.py)."""
import sys

from fastload.bench.kernel import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
