#!/bin/sh
# A warren `pipe` handler in POSIX shell, started once per worker:
#
#     [handler]
#     kind = "pipe"
#     command = ["/path/to/pipe_handler.sh"]
#
# For each message warren writes one line of JSON, then exactly `size` bytes of body, and waits
# for one answer line on stdout: the message's tag, a space, then `ack`, `retry` or `dead`,
# optionally followed by a space and a reason ("7 ack"). Log to stderr (it goes to warren's log),
# never to stdout. Exit when stdin closes.
#
# This example counts the body's lines and words with wc and logs them. Each message still
# starts wc, so a shell pipe handler saves the shell's start, not every fork; it is here to show
# the protocol. The body is read with `head -c`, which (in GNU coreutils and busybox) reads no
# more than it is asked for, so the next header stays on stdin.

# `read` takes the header line byte by byte, never reading past its newline.
while IFS= read -r header; do
    # warren writes compact JSON with "tag" as the first key and "size" as the last:
    # {"tag":7,"id":...,"size":11}
    tag=${header#\{\"tag\":}
    tag=${tag%%[!0-9]*}
    size=${header##*\"size\":}
    size=${size%%[!0-9]*}
    if [ -z "$tag" ] || [ -z "$size" ]; then
        echo "cannot find the tag and size in the header: $header" >&2
        exit 1
    fi
    if [ "$size" -eq 0 ]; then
        echo "$tag dead the message is empty"
        continue
    fi
    counts=$(head -c "$size" | wc -l -w) || { echo "$tag retry wc failed"; continue; }
    set -- $counts
    echo "body of $size bytes: $1 lines, $2 words" >&2
    echo "$tag ack"
done
