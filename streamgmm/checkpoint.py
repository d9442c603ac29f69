"""The daemon's checkpoint files: streamgmm's versioned, pickle-free state files.

The format itself (kind, version, SHA-256 digest, atomic writes) lives in
:mod:`streamgmm.statefile`, a module of no dependencies that the math core (mixture, detector)
uses for its own ``save``/``load`` without reaching up into the daemon's side of the package;
this module is the name the daemon, the CLI and the tests know it by.
"""

from streamgmm.statefile import CheckpointError, dumps_state, loads_state, read_state, write_state

__all__ = ["CheckpointError", "write_state", "read_state", "dumps_state", "loads_state"]
