"""The Triton replay kernel vs per-image torch ops on a GPU (see fastload/bench/triton_replay.py)."""
import sys

from fastload.bench.triton_replay import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
