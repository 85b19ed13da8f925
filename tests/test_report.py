"""
C{mailstack report} on the log of a real server run: local deliveries,
rejections, relayed mail that is delivered, deferred and bounced by a
remote MTA (a scripted sink on loopback).
"""

import gzip
import os
import smtplib
import socket
import subprocess
import sys
import threading

from twisted.trial.unittest import SynchronousTestCase

from mailstack.report import format_report, summarise
from tests.processes import ROOT, Twistd
from tests.support import short_tempdir


class ScriptedSink:
    """
    A remote MTA in a thread: RCPT gets 550 for addresses starting with
    "bounce", 451 for "later", 250 otherwise.
    """

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(10)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.listener.close()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn):
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 sink.test ESMTP\r\n")
            accepted = 0
            for raw in lines:
                line = raw.strip().decode("ascii", "replace")
                verb = line[:4].upper()
                if verb in ("EHLO", "HELO"):
                    conn.sendall(b"250 sink.test\r\n")
                elif verb == "RCPT":
                    local = line.split("<", 1)[1].lower()
                    if local.startswith("bounce"):
                        conn.sendall(b"550 5.1.1 <" + local.encode() + b" no such user\r\n")
                    elif local.startswith("later"):
                        conn.sendall(b"451 4.7.1 greylisted, try later\r\n")
                    else:
                        accepted += 1
                        conn.sendall(b"250 2.1.5 ok\r\n")
                elif verb == "DATA":
                    conn.sendall(b"354 go\r\n")
                    for body in lines:
                        if body == b".\r\n":
                            break
                    conn.sendall(b"250 2.0.0 queued as SINK1\r\n")
                elif verb == "QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")


class ReportTests(SynchronousTestCase):
    def test_report_of_a_real_run(self):
        """
        The report counts what the server did, by kind, reason, sender,
        recipient and domain, from its own log (plain or gzipped).
        """
        data = short_tempdir(self)
        sink = ScriptedSink()
        self.addCleanup(sink.close)
        server = Twistd(["--data-dir", data, "--hostname", "mx.test",
                         "--smtp", "tcp:0:interface=127.0.0.1",
                         "--relay-networks", "127.0.0.0/8",
                         "--route", f"remote.test=127.0.0.1:{sink.port}",
                         "--submission", "none", "--submissions", "none", "--imap", "none",
                         "--imaps", "none", "--pop3", "none"])
        self.addCleanup(server.stop)
        port = server.ports("smtp")["smtp"]
        env = dict(os.environ, PYTHONPATH=ROOT)
        for user in ("alice@localhost", "bob@localhost"):
            subprocess.run([sys.executable, "-m", "mailstack", "--data-dir", data, "user", "add",
                            user], input=b"pw\n", env=env, check=True, capture_output=True)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("carol@example.org", ["alice@localhost", "bob@localhost"],
                            b"Subject: one\r\n\r\nx\r\n")
            client.sendmail("carol@example.org", ["alice@localhost"], b"Subject: two\r\n\r\nx\r\n")
            with self.assertRaises(smtplib.SMTPRecipientsRefused):
                client.sendmail("dave@example.net", ["ghost@localhost"], b"Subject: 3\r\n\r\nx\r\n")
            client.sendmail("alice@localhost", ["friend@remote.test", "bounce@remote.test",
                                                "later@remote.test"],
                            b"Subject: out\r\n\r\nx\r\n")
        server.wait_for(r"to=<friend@remote\.test> .*status=sent")
        server.wait_for(r"to=<later@remote\.test> .*status=deferred")
        server.wait_for(r"to=<bounce@remote\.test> .*status=bounced")
        server.wait_for(r"to=<alice@localhost> .*status=sent \(delivered")  # the bounce
        server.stop()
        log = os.path.join(data, "mailstack.log.gz")
        with gzip.open(log, "wt") as f:
            f.write(server.output())

        report = summarise(server.lines)
        self.assertEqual(report.received, 4)  # three by SMTP, the bounce
        self.assertEqual(report.received_local, 1)
        # alice twice, bob, friend@remote.test, the bounce to alice
        self.assertEqual(report.delivered, 5)
        self.assertEqual(report.delivered_local, 4)
        self.assertEqual((report.deferred, report.bounced, report.rejected), (1, 1, 1))
        self.assertEqual(report.senders.most_common(2), [("carol@example.org", 2),
                                                          ("alice@localhost", 1)])
        self.assertEqual(report.recipients["alice@localhost"], 3)
        self.assertEqual(report.recipient_domains["localhost"], 4)
        self.assertEqual(report.deferred_domains, {"remote.test": 1})
        [(reason, count)] = report.reject_reasons.items()
        self.assertEqual(count, 1)
        self.assertIn("RCPT: 550 5.1.1", reason)
        self.assertNotIn("ghost", reason)
        self.assertIn("greylisted", next(iter(report.defer_reasons)))
        self.assertEqual(len(report.delays), 5)

        result = subprocess.run([sys.executable, "-m", "mailstack", "report", log],
                                capture_output=True, env=env, timeout=60, check=False)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.decode(), format_report(report))
        text = result.stdout.decode()
        self.assertIn("       4  received", text)
        self.assertIn("       1  rejected", text)
        self.assertIn("Top senders", text)

    def test_journal_lines(self):
        """
        Lines as journalctl prints them are read too.
        """
        lines = [
            "Nov 29 06:25:01 mx twistd[812]: 4F2A9C0B1D2E: from=<a@x.test> size=10 nrcpt=1",
            ("Nov 29 06:25:01 mx twistd[812]: 4F2A9C0B1D2E: to=<b@y.test> relay=local "
            "delay=0.20 dsn=2.0.0 status=sent (delivered to maildir)"),
            ("Nov 29 06:25:02 mx twistd[812]: reject: MAIL from unknown[192.0.2.1]:25: "
            "<a@x.test> not owned by b@y.test"),
        ]
        report = summarise(lines)
        self.assertEqual((report.received, report.delivered, report.rejected), (1, 1, 1))
        self.assertEqual((report.first, report.last), ("Nov 29 06:25:01", "Nov 29 06:25:02"))
