"""Exceptions raised by numba_ep.

- ``NumbaEPError``: base class of every error this library raises on purpose.
- ``CommTimeoutError``: a wait ran past its timeout (a host-side collective of a ``Group``, or a
  device-side spin-wait). It says what was awaited (``what``), by whom (``rank``) and for whom
  (``peer``: one rank, a tuple of ranks, or None when unknown). It is also a ``TimeoutError``, so
  ``except TimeoutError`` catches it.
"""


class NumbaEPError(RuntimeError):
    """Base class of numba_ep's errors."""


class CommTimeoutError(NumbaEPError, TimeoutError):
    """A wait for other ranks (or for a device-side counter) did not finish in time.

    Attributes: ``what`` (str, the operation), ``rank`` (int or None, the rank that waited),
    ``peer`` (int, tuple of ints, or None: the rank(s) that did not arrive).
    """

    def __init__(self, message, *, what=None, rank=None, peer=None):
        super().__init__(message)
        self.what = what
        self.rank = rank
        self.peer = peer

    def __str__(self):
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):
        # Keep the keyword attributes when the error crosses a process boundary.
        return (_rebuild_comm_timeout, (str(self), self.what, self.rank, self.peer))


def _rebuild_comm_timeout(message, what, rank, peer):
    return CommTimeoutError(message, what=what, rank=rank, peer=peer)
