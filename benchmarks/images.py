"""Image loader benchmark (``fastload bench``); see fastload/bench/images.py for options."""
import sys

from fastload.bench.images import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
