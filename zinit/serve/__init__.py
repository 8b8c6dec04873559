"""Many adapters behind one server: the continuous-batching engine (:mod:`zinit.serve.engine`) that ``zinit serve``
runs. Depends on the core, never the reverse."""

from .engine import Engine, QueueFull, Request, ShuttingDown

__all__ = ["Engine", "QueueFull", "Request", "ShuttingDown"]
