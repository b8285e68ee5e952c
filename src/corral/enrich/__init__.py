"""Enrich: who did it.  Joins each event to its process and ancestry."""

from corral.enrich.proctable import Process, ProcessTable

__all__ = ["Process", "ProcessTable"]
