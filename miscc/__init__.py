"""Library code shared by the command lines.

Importing the package picks OpenMP's wait policy before torch loads its OpenMP runtime
(`miscc.wait_policy`): threads spin on idle cores, where that is fastest, and sleep between
parallel regions when another process already keeps a core busy, where spinning made a
two-thread run collapse (docs/DESIGN.md §11, docs/benchmarks.md). The command lines import this
package before torch.
"""

from miscc import wait_policy

wait_policy.apply()
