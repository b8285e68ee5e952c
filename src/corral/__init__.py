"""corral: contain autonomous AI agents and watch what they do, at the kernel."""

from corral.errors import CorralError, HostError
from corral.monitor import Monitor

__all__ = ["CorralError", "HostError", "Monitor"]
__version__ = "0.1.0"
