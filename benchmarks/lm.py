"""Dataset Decomposition benchmark on the Python standard library's sources (see fastload/bench/lm.py)."""
import sys

from fastload.bench.lm import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
