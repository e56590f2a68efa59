#!/usr/bin/env python
"""Meta-train a learned optimizer: ``accelerate launch scripts/metatrain.py --config configs/X.yaml``.

A thin entry point: everything lives in :func:`lopt_hf.publish.metatrain_command.main` (also reachable
as ``lopt-hf metatrain``). Run with ``--help`` for the options; typical uses::

    accelerate launch scripts/metatrain.py --config configs/quickstart.yaml
    accelerate launch --num_processes 2 scripts/metatrain.py --config configs/small_fc_pes.yaml
    accelerate launch scripts/metatrain.py --config configs/quickstart.yaml --resume
    accelerate launch scripts/metatrain.py --config configs/quickstart.yaml --push-to-hub you/my-lopt

Plain ``python scripts/metatrain.py ...`` runs it as a single process.
"""

import sys

from lopt_hf.publish.metatrain_command import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
