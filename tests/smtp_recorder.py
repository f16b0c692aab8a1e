"""An SMTP server that records what it receives, for the SMTP provider's tests.

aiosmtpd (PyPI) on 127.0.0.1. Each message it accepts is appended to RECORDS as one JSON line:
the envelope (MAIL FROM, RCPT TOs), the raw message, and what Python's own email parser reads in
it (headers decoded, content type, every part's content, the parser's defects). It can be told
to answer 550 at RCPT for some addresses, 451 after DATA for others, to record a message and
then never answer, and to require AUTH. It prints "listening PORT" once it listens and exits
when its standard input closes (the test that started it ended).
"""

import argparse
import asyncio
import itertools
import json
import os
import socket
import sys
import threading
import time
from email import policy
from email.parser import BytesParser
from email.utils import parsedate_to_datetime

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


def describe(raw: bytes) -> dict:
    message = BytesParser(policy=policy.default).parsebytes(raw)

    def header(name):
        value = message[name]
        return None if value is None else str(value)

    try:
        date_valid = parsedate_to_datetime(message["Date"]) is not None
    except (TypeError, ValueError):
        date_valid = False
    parts = [
        {
            "content_type": part.get_content_type(),
            "charset": part.get_content_charset(),
            "content": part.get_content(),
        }
        for part in message.walk()
        if not part.is_multipart()
    ]
    return {
        "content_type": message.get_content_type(),
        "subject": header("Subject"),
        "from": header("From"),
        "to": header("To"),
        "message_id": header("Message-ID"),
        "date_valid": date_valid,
        "mime_version": header("MIME-Version"),
        "list_unsubscribe": header("List-Unsubscribe"),
        "list_unsubscribe_post": header("List-Unsubscribe-Post"),
        "request": header("X-Haishin-Request"),
        "parts": parts,
        "defects": [repr(d) for part in message.walk() for d in part.defects],
    }


class Recorder:
    def __init__(self, args):
        self.records = open(args.records, "a", encoding="utf-8")
        self.refuse = set(args.refuse)
        self.defer = set(args.defer)
        self.hang = set(args.hang)
        self.delay = args.delay_ms / 1000
        self.queue_ids = itertools.count(1)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return f"550 5.1.1 <{address}>: Recipient address rejected: mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.defer.intersection(envelope.rcpt_tos):
            return "451 4.3.0 Temporary local problem, try again later"
        raw = envelope.original_content
        queue_id = f"Q{next(self.queue_ids):06d}"
        record = {
            "queue_id": queue_id,
            "received_at": time.time(),
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "raw": raw.decode("utf-8", "replace"),
            **describe(raw),
        }
        self.records.write(json.dumps(record) + "\n")
        self.records.flush()
        if self.hang.intersection(envelope.rcpt_tos):
            await asyncio.sleep(3600)
        return f"250 2.0.0 Ok: queued as {queue_id}"


def authenticator(expected):
    def check(server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == expected
        return AuthResult(success=ok, handled=False)

    return check


def exit_when_stdin_closes():
    sys.stdin.read()
    os._exit(0)


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", required=True)
    parser.add_argument("--refuse", action="append", default=[])
    parser.add_argument("--defer", action="append", default=[])
    parser.add_argument("--hang", action="append", default=[])
    parser.add_argument("--auth", help="USER:PASSWORD that AUTH must present")
    parser.add_argument("--delay-ms", type=float, default=0, help="wait this long before answering each message")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args()
    options = {"hostname": "recorder.test"}
    if args.auth:
        user, password = args.auth.split(":", 1)
        options.update(
            auth_required=True,
            auth_require_tls=False,
            authenticator=authenticator((user.encode(), password.encode())),
        )
    handler = Recorder(args)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", args.port))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, **options), sock=sock)
    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    print(f"listening {sock.getsockname()[1]}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
