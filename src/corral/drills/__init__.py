"""Drills: a lab network with no route out (lab), its fake servers (servers), and the demo (demo).

`corral lab up|down|status` and `corral demo` are in drills/cli.py; nothing here is loaded by the
sensor, the sandbox or detection.
"""
