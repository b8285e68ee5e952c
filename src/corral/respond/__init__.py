"""Respond: stop what can be stopped, in the kernel and within milliseconds; deliver every alert."""
