"""The errors zinit raises about what it was given, under one base class.

Every error zinit raises on purpose about its input (a value, a file, a name, a model, a missing optional package, a
state that forbids the call) is a :class:`ZinitError`, or a ``ValueError``/``OSError`` (bad values and files, whoever
raises them). Each subclass also derives from the built-in exception a caller would catch without knowing zinit
(``except KeyError`` still catches a missing adapter name), so code written against earlier versions keeps working.

The ``zinit`` command tells bad input from a bug by type alone (:func:`zinit.cli.is_input_error`): bad input prints
one line, ``zinit: error: <message>``, and exits with status 2; anything else keeps its traceback.

>>> import zinit, timm
>>> from zinit.errors import ZinitError
>>> try:
...     zinit.use_adapters(timm.create_model("vit_tiny_patch16_224"), "a").__enter__()
... except ZinitError as exc:
...     print(type(exc).__name__, isinstance(exc, ValueError), exc)
ZinitValueError True this model has no named adapters: add one with zinit.add_adapter(model, name, folder)
"""

from __future__ import annotations


class ZinitError(Exception):
    """Base class of the errors zinit raises on purpose about its input; the message names the bad value and the fix.

    Messages are shown as written (a list of bad records stays one record per line), and a key error's message is not
    quoted (``str(exc)`` is the message, unlike a plain ``KeyError``).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ZinitValueError(ZinitError, ValueError):
    """A bad value or file content: an option out of range, an adapter for another model, a corrupt file."""


class ZinitKeyError(ZinitError, KeyError):
    """A name or key that is not there: no adapter of that name, tensors missing from (or extra in) a state dict."""


class ZinitStateError(ZinitError, RuntimeError):
    """The model or resource is in a state that forbids the call (already injected, an adapter still in use, no CUDA
    where CUDA was asked for); the message says what to do first."""


class ZinitImportError(ZinitError, ImportError):
    """An optional dependency the call needs is not installed; the message gives the ``pip install`` line."""


__all__ = ["ZinitError", "ZinitImportError", "ZinitKeyError", "ZinitStateError", "ZinitValueError"]
