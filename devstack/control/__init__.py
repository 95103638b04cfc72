"""Control API of the stack: ``server`` (the HTTP side, in the stack process) and ``client`` (``Stack`` /
``SandboxClient``, used by tests, ``make run`` and the benchmarks).  The client names are re-exported here
because nearly every test imports them; importing this package never loads the server."""

from devstack.control.client import ControlError, SandboxClient, Stack

__all__ = ["ControlError", "SandboxClient", "Stack"]
