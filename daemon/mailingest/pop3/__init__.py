"""POP3: the only package that touches ``poplib``. ``Pop3Session`` is the one blocking
session per account that the fetch, ``check`` and ``release`` run in worker threads."""

from mailingest.pop3.session import Pop3Session

__all__ = ["Pop3Session"]
