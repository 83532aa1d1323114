"""A plain POP3 server on loopback that serves mailboxes held in memory, for ``mailingest demo``
(and, subclassed with faults, the test suite's scripted server).

mailbox.py holds the mail and its form on the wire; server.py the protocol and the listener.
"""

from mailingest.popserver.mailbox import Entry, Mailbox, served_chunks
from mailingest.popserver.server import (
    CAPABILITIES,
    TRANSACTION,
    LoopbackPop3Server,
    LoopbackSession,
)

__all__ = [
    "CAPABILITIES",
    "TRANSACTION",
    "Entry",
    "LoopbackPop3Server",
    "LoopbackSession",
    "Mailbox",
    "served_chunks",
]
