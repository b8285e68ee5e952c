"""Detect: rules and stateful detectors that turn events into derived events and alerts."""
