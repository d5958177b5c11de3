"""Library code shared by the command lines.

Importing the package sets OpenMP's wait policy to PASSIVE (unless the environment already sets
one) before torch loads its OpenMP runtime: with the default spin-waiting, torch's threads burn
their cores between parallel regions, and on a machine where another process keeps a core busy
a two-thread run became about 4x slower than a one-thread run (docs/DESIGN.md §11,
docs/benchmarks.md).
The command lines import this package before torch; the Makefile exports the same setting.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
