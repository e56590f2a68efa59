"""``python -m lopt_hf.metatrain`` / ``accelerate launch -m lopt_hf.metatrain``: the ``lopt-hf metatrain`` command.

An entry point, not part of the meta-trainer: it runs :func:`lopt_hf.publish.metatrain_command.main`
(train, then export the artifact with its card), so it sits on top of the layers with the other
commands (``tests/package/test_layers.py`` lists it there). ``accelerate launch`` needs a module or a
script to start in every process; this module is that, for an installed package.
"""

import sys

from lopt_hf.publish.metatrain_command import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m lopt_hf.metatrain"))
