#!/usr/bin/env python
"""Meta-train a learned optimizer from a checkout: ``accelerate launch scripts/metatrain.py --config quickstart``.

A thin entry point: everything lives in :func:`lopt_hf.publish.metatrain_command.main`, which an
installed package also reaches as ``lopt-hf metatrain`` and ``accelerate launch -m lopt_hf.metatrain``
(no checkout needed). ``--config`` takes a shipped config's name (``--list-configs``) or a YAML path::

    accelerate launch scripts/metatrain.py --config quickstart
    accelerate launch --num_processes 2 scripts/metatrain.py --config configs/small_fc_pes.yaml
    accelerate launch scripts/metatrain.py --config quickstart --resume
    accelerate launch scripts/metatrain.py --config quickstart --push-to-hub you/my-lopt

Plain ``python scripts/metatrain.py ...`` runs it as a single process.
"""

import sys

from lopt_hf.publish.metatrain_command import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
