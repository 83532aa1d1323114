"""How a session signs in: USER and PASS, or OAuth2 through SASL (RFC 5034, RFC 7628).

Apart from the session so that the session reads as connect, list, retrieve, delete;
everything here runs in the session's worker thread on its poplib object.
"""

from __future__ import annotations

import poplib
from collections.abc import Callable

from mailingest.errors import AuthError, Pop3Error, ProtocolError
from mailingest.model import Pop3Login
from mailingest.pop3.replies import TRANSIENT_CODES
from mailingest.pop3.wire import BoundedLines, Capabilities, response_code, sasl_error
from mailingest.sasl import OAUTH2_MECHANISMS, oauthbearer, xoauth2


def user_pass(pop: BoundedLines, login: Pop3Login) -> None:
    """USER, then PASS once USER is answered: never in one write, even where the server
    pipelines. Dovecot answers USER at once and PASS after its auth, two writes; the second
    waits (Nagle) for the ACK of the first, which the client's kernel delays (40 ms) as it
    has nothing to send: 43 ms for the pair in one write against 4 ms lock-step, measured
    on loopback (and Courier loses what follows PASS in the same write)."""
    pop.user(login.username)
    pop.pass_(login.password())


def mechanism(login: Pop3Login, capabilities: Capabilities) -> str:
    """The OAuth2 SASL mechanism: the configured one, else the first of ours in CAPA."""
    wanted = login.sasl or "auto"
    if wanted != "auto":
        return wanted.upper()
    offered = {name.upper() for name in capabilities.arg("SASL")}
    for name in OAUTH2_MECHANISMS:
        if name in offered:
            return name
    if offered:
        raise AuthError(
            f"the server offers SASL {' '.join(sorted(offered))}, neither XOAUTH2 nor "
            "OAUTHBEARER: it does not take OAuth2 sign-in",
            account=login.name,
        )
    # No SASL line (or no CAPA before login): XOAUTH2 is what Google and Microsoft document.
    return "XOAUTH2"


def sasl(
    pop: BoundedLines, login: Pop3Login, mechanism: str, refuse: Callable[[bytes], Pop3Error]
) -> None:
    """RFC 5034 AUTH in two steps: the response goes on a line of its own after the
    server's ``+``, never on the AUTH line (Microsoft refuses the one-line form; it
    also keeps the AUTH line under RFC 5034's 255 octets). ``refuse`` types a busy
    server's final -ERR (the session's error boundary)."""
    token = login.password()
    if mechanism == "XOAUTH2":
        response = xoauth2(login.username, token)
    else:
        response = oauthbearer(login.username, token, login.host, login.port)
    pop.secrets = (token, response)
    if pop.continuation(f"AUTH {mechanism}").startswith(b"+OK"):
        raise ProtocolError(f"server answered AUTH {mechanism} with +OK before any response")
    reply = pop.continuation(response)
    if reply.startswith(b"+OK"):
        return
    # A challenge after the response carries the error (RFC 7628 3.2.2); the client
    # ends the exchange (a dummy response) and the server answers -ERR.
    details = sasl_error(reply)
    try:
        pop.continuation("AQ==" if mechanism == "OAUTHBEARER" else "")
    except poplib.error_proto as exc:
        final = exc.args[0] if exc.args and isinstance(exc.args[0], bytes) else b""
        if response_code(final) in TRANSIENT_CODES:  # busy, not a verdict on the token
            raise refuse(final) from None
    except ProtocolError:
        pass
    raise AuthError(f"login rejected ({mechanism}): {details}", account=login.name)
