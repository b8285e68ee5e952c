"""corral: contain autonomous AI agents and watch what they do, at the kernel.

The public API is small:

- :class:`Monitor`: the kernel sensor and the process table; watch cgroups, read events.
- :class:`Sandbox`: run commands contained and watched, one step at a time.
- :class:`Policy` and :func:`load_policy`: what a sandbox may do (egress, limits, files).
"""

from corral.errors import CorralError, HostError
from corral.monitor import Monitor
from corral.sandbox.policy import Policy, load_policy
from corral.sandbox.runner import Result, Sandbox

__all__ = ["CorralError", "HostError", "Monitor", "Policy", "Result", "Sandbox", "load_policy"]
__version__ = "0.1.0"
