"""Image loader benchmark (``fastload bench``); see fastload/bench/images.py for options."""
import os
import sys

from fastload.bench.images import main

if __name__ == "__main__":
    # this script updates the checkout's committed results; `fastload bench` writes to the cache
    argv = sys.argv[1:]
    if not any(a == "--out-dir" or a.startswith("--out-dir=") for a in argv):
        argv += ["--out-dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")]
    sys.exit(main(argv))
