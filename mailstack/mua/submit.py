# -*- test-case-name: tests.test_mua -*-
"""
Submitting a composed message to a submission server, with mailstack's own
SMTP client: TLS always (STARTTLS or implicit), the server's certificate
verified with service-identity unless the user said C{--insecure}, AUTH
only inside TLS.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Sequence

from OpenSSL.SSL import Error as SSLError
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectionLost, TimeoutError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory

from mailstack.reactors import IMailReactor
from mailstack.smtp.client import (
    SMTPClientError, SMTPClientProtocol, Timeouts, TLSRequired, Transaction, send_transaction,
)

# Exit statuses (sysexits.h), what scripts can rely on.
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69  # the server refused for good (5xx)
EX_SOFTWARE = 70
EX_PROTOCOL = 76  # TLS failed or the certificate did not verify
EX_TEMPFAIL = 75  # try again later (4xx, network)
EX_NOPERM = 77  # authentication refused


class SubmitError(Exception):
    """
    Submission failed; C{status} is the exit status to use.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Server:
    host: str
    port: int
    implicit_tls: bool
    cafile: str | None = None
    insecure: bool = False


def tls_options(server: Server) -> Any:
    if server.insecure:
        return ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    if server.cafile:
        try:
            with open(server.cafile, "rb") as f:
                trust = ssl.trustRootFromCertificates(
                    [ssl.Certificate.loadPEM(f.read())])
        except OSError as e:
            raise SubmitError(f"cannot read {server.cafile}: {e.strerror}", EX_NOINPUT) from None
    else:
        trust = ssl.platformTrust()
    return ssl.optionsForClientTLS(server.host, trustRoot=trust)


async def submit(reactor: IMailReactor, server: Server, credentials: tuple[str, str] | None,
                 sender: str, recipients: Sequence[str], content: bytes,
                 helo: str = "localhost") -> dict[str, Any]:
    """
    Send the message; return the reply for each recipient, or raise
    L{SubmitError} with the server's reply quoted.
    """
    options = tls_options(server)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, server.host, server.port,
                                                       timeout=30)
    if server.implicit_tls:
        endpoint = wrapClientTLS(options, endpoint)
    proto = SMTPClientProtocol(reactor)
    try:
        await endpoint.connect(Factory.forProtocol(lambda: proto))
        result = await send_transaction(
            proto, helo, Transaction(sender, list(recipients), io.BytesIO(content), len(content)),
            tls_context=None if server.implicit_tls else options,
            require_tls=not server.implicit_tls, credentials=credentials,
            implicit_tls=server.implicit_tls,
            timeouts=Timeouts(greeting=60, command=120),
        )
    except TLSRequired as e:
        raise SubmitError(f"{server.host} offers no TLS: {e.reply.code} {e.reply.text}",
                          EX_PROTOCOL) from None
    except SMTPClientError as e:
        reply = e.reply
        quoted = f"{reply.code} {reply.enhanced} {reply.text}".replace("  ", " ")
        if e.stage == "AUTH" and reply.code == 535:
            raise SubmitError(f"authentication failed: {quoted}", EX_NOPERM) from None
        status = EX_UNAVAILABLE if reply.code >= 500 else EX_TEMPFAIL
        raise SubmitError(f"the server refused the message at {e.stage}: {quoted}",
                          status) from None
    except (VerificationError, SSLError) as e:
        raise SubmitError(f"TLS with {server.host} failed (certificate not trusted?): {e}",
                          EX_PROTOCOL) from None
    except (ConnectError, ConnectionLost, TimeoutError, OSError) as e:
        raise SubmitError(f"cannot talk to {server.host}:{server.port}: {e}",
                          EX_TEMPFAIL) from None
    finally:
        if proto.transport is not None:
            proto.transport.loseConnection()
    return {rcpt: result.reply_for(rcpt) for rcpt in recipients}
