"""A container command for busybox httpd that answers its version at `PATH`, as the canary's
real tests and bench need: with `fail_one_in=N`, one request in N answers 500 (1: every one);
the body is the version either way."""

from __future__ import annotations

PATH = "/cgi-bin/app"


def app(version: str, fail_one_in: int = 0, delay_ms: int = 0, delay: float = 0) -> list[str]:
    """`sh -c ...`: httpd on 8080 with a CGI script at PATH answering `version`; with
    `delay_ms`, each answer is that much slower (a slow version that makes no error); with
    `delay` (seconds), the handler sleeps first (a slow request to hold in flight)."""
    fail = (f'if [ $((RANDOM % {fail_one_in})) -eq 0 ]; then echo "Status: 500 Oops"; fi\n'
            if fail_one_in else "")
    if delay_ms:
        fail += f"usleep {delay_ms * 1000}\n"
    if delay:
        fail = f"sleep {delay:g}\n" + fail
    script = f"#!/bin/sh\n{fail}echo Content-Type: text/plain\necho\necho {version}\n"
    return ["sh", "-c", "hostname > /www/index.html && mkdir -p /www/cgi-bin && "
            f"printf '%s' '{script}' > /www/cgi-bin/app && chmod +x /www/cgi-bin/app && "
            "exec httpd -f -p 8080 -h /www"]


POSTS = "/tmp/posts"  # where `counting_app` writes the query string of every POST it answers


def counting_app(version: str) -> list[str]:
    """Like `app`, and every POST's query string appended to POSTS in the container (to count
    the POSTs a server really received)."""
    script = (f'#!/bin/sh\nif [ "$REQUEST_METHOD" = POST ]; then echo "$QUERY_STRING" '
              f">> {POSTS}; fi\necho Content-Type: text/plain\necho\necho {version}\n")
    return ["sh", "-c", "hostname > /www/index.html && mkdir -p /www/cgi-bin && "
            f"printf '%s' '{script}' > /www/cgi-bin/app && chmod +x /www/cgi-bin/app && "
            "exec httpd -f -p 8080 -h /www"]
