"""Dataset Decomposition for LLM pretraining: tokenize text files (byte-level), split every
document into power-of-two chunks once, then train with one length bucket per step and a
constant number of tokens per step. ``python examples/decompose_and_load.py [WORKDIR]``."""
import os
import sys
import sysconfig
import tempfile

import fastload
from fastload.tokens.decompose import tokenize_folder


def main(workdir: str) -> int:
    # Real documents that ship with every Python: the standard library's own sources.
    stdlib = sysconfig.get_paths()["stdlib"]
    tokens = tokenize_folder(stdlib, os.path.join(workdir, "tokens"), pattern="*.py")
    fastload.decompose(tokens, out=os.path.join(workdir, "dd"), min_bucket=6, max_bucket=10,
                       seed=0, progress=False)
    loader = fastload.DecompositionLoader(os.path.join(workdir, "dd"), tokens_per_step=2**12,
                                          curriculum="pow2", seed=0)
    steps = 0
    for input_ids, targets in loader:  # [B, 2^k] each, B * 2^k == tokens_per_step
        assert input_ids.numel() == 2**12 and targets.shape == input_ids.shape
        steps += 1
    print(f"{steps} steps of {2**12} tokens")
    return steps


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:  # a temporary folder, removed afterwards
        with tempfile.TemporaryDirectory(prefix="fastload_example_") as tmp:
            main(tmp)
