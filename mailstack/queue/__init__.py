"""
The durable outbound queue: messages for remote recipients, stored on
disk (L{store}), tried on a retry schedule (L{runner}) through the SMTP
client (L{courier}), bounced with a delivery status notification
(L{dsn}); receiver processes hand theirs to it (L{handoff}); the
C{mailstack queue} command talks to it (L{control}).
"""
