"""`python -m pybitnet.train --config recipe.yaml [--key value ...]`, also under torchrun:
`torchrun --nproc-per-node 2 -m pybitnet.train --config recipe.yaml`."""

from __future__ import annotations

import sys

from ..cli.train import run_from_argv

if __name__ == "__main__":
    sys.exit(run_from_argv(sys.argv[1:]))
