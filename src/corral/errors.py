"""Errors that end a corral command with one clear line saying what to do."""


class CorralError(Exception):
    """Base of errors corral reports to the user as one line (exit status 2)."""


class HostError(CorralError):
    """This host cannot run the sensor as it is; the message names the fix."""
