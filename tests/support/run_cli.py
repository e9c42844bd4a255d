"""`dit-bench` with the tests' tiny plug-in registered: for subprocess and torchrun tests."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

torch.set_num_threads(1)

from tests.support.tiny import register_tiny_method  # noqa: E402

register_tiny_method()

import cli  # noqa: E402

if __name__ == "__main__":
    cli.main()
