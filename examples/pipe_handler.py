#!/usr/bin/env python3
"""A warren `pipe` handler in Python: started once per worker, it handles message after message.

Configure it with

    [handler]
    kind = "pipe"
    command = ["python3", "/path/to/pipe_handler.py"]

For each message warren writes one line of JSON, then exactly `size` bytes of body:

    {"tag": 1, "id": "...", "queue": "...", "attempt": 1, "redelivered": false, "size": 11}
    hello world

and waits for one answer line on stdout: the message's tag, a space, then `ack`, `retry` or
`dead`, optionally followed by a space and a reason (`1 ack`, `1 retry the database is down`). Write anything else (logs, tracebacks) to stderr, which goes to warren's log; never
print to stdout. When warren closes stdin, exit.

This example does the tutorial's work: it sleeps one second per "." in the body. A body that is
not UTF-8 text can never succeed, so it answers `dead`; an exception answers `retry`, so the
message comes back later (up to retry.max_attempts).
"""

import json
import sys
import time
import traceback


def handle(header, body):
    """The work for one message. Returns the answer, without the tag or a newline."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "dead the body is not UTF-8 text"
    dots = text.count(".")
    if dots:
        time.sleep(dots)  # even sleep(0) costs a timer's slack, about 50µs
    return "ack"


def main():
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        line = stdin.readline()
        if not line:
            return  # warren closed stdin: it is stopping
        header = json.loads(line)
        body = stdin.read(header["size"])
        if len(body) != header["size"]:
            return  # stdin closed mid-message
        try:
            answer = handle(header, body)
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            answer = "retry " + " ".join(repr(error).split())
        stdout.write(b"%d %s\n" % (header["tag"], answer.encode("utf-8")))
        stdout.flush()


if __name__ == "__main__":
    main()
