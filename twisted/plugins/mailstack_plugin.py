"""
The twistd dropin: C{twistd mailstack} builds its service from L{mailstack.tap}.
"""

from twisted.application.service import ServiceMaker

mailstack = ServiceMaker(
    "mailstack",
    "mailstack.tap",
    "A complete mail system for one host: SMTP, submission, queue, IMAP, POP3",
    "mailstack",
)
