"""Containment: cgroups, network namespace, egress policy, DNS, canaries, runner."""
