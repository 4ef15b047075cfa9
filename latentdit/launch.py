"""``python -m latentdit.launch [accelerate launch arguments] script.py [script arguments]``.

The same as ``accelerate launch``, except that a user error in a worker ends with its one-line
message (once) and exit status 2 instead of the launcher's traceback (see :mod:`latentdit.distributed`).
"""

from __future__ import annotations

import sys

from latentdit.distributed import launch_main

if __name__ == "__main__":
    sys.exit(launch_main())
