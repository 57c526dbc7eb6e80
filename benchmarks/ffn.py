"""Sparse ReLU FFN benchmark (same as ``fastload bench --ffn``)."""
import sys

from fastload.bench.ffn import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
