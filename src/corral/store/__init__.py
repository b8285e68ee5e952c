"""record: where sandboxes, steps, events, alerts and evidence are kept for later.

Callers see two things:

- ``Store``, the storage interface: a handful of writes (one transaction per
  call) and queries that return plain dicts.  ``SqliteStore`` (WAL, one file
  in the data directory) is the embedded default; a PostgreSQL store would
  implement the same methods and nothing that calls them would change.
- ``Recorder``, which a Sandbox hands what it sees: it batches events on a
  thread of its own (so the detection thread never waits for a disk) and
  writes alerts ahead of any queued events.

``open_store(data_dir)`` opens the default store; errors are ``StoreError``
with one line that says what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from corral.store.base import EventRow, Store, StoreError
from corral.store.recorder import Recorder
from corral.store.sqlite import SqliteStore

__all__ = ["EventRow", "Recorder", "SqliteStore", "Store", "StoreError", "default_data_dir", "open_store"]

DB_NAME = "corral.db"


def default_data_dir() -> Path:
    """$CORRAL_DATA, else $XDG_STATE_HOME/corral, else ~/.local/state/corral."""
    if os.environ.get("CORRAL_DATA"):
        return Path(os.environ["CORRAL_DATA"])
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "corral"


def open_store(data_dir: str | Path | None = None) -> SqliteStore:
    """The store in `data_dir` (made if missing; default: default_data_dir())."""
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise StoreError(f"cannot make the data directory {directory}: {e.strerror}; pass --data DIR "
                         "with a directory you can write") from e
    return SqliteStore(directory / DB_NAME)
