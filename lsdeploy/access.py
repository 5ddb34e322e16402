"""What the server's WSGI wrapper needs around every request: the basic-auth check, and the
access-log line (a printable path, and the one handler that can take the line directly)."""
from __future__ import annotations

import base64
import binascii
import hmac
import logging
from typing import Optional

access_log = logging.getLogger("lsdeploy.access")


def authorized(header: Optional[str], credentials: tuple) -> bool:
    """An `Authorization: Basic ...` header carrying exactly these (user, password) bytes."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    user, sep, password = decoded.partition(b":")
    # both compared, always: the time taken says nothing about which one was wrong
    user_ok = hmac.compare_digest(user, credentials[0])
    password_ok = hmac.compare_digest(password, credentials[1])
    return bool(sep) and user_ok and password_ok


def printable_path(path: str) -> str:
    """PATH_INFO as text for a log line: UTF-8 decoded, control characters escaped (a path
    cannot forge a second log line)."""
    try:
        path = path.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:
        pass
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)


def direct_handler():
    """The one handler an access line reaches when it can take the line directly (lsdeploy's
    StderrHandler, no filters anywhere on the way), else None (then a LogRecord is built)."""
    if access_log.filters or not access_log.propagate or access_log.disabled:
        return None
    found = None
    logger = access_log
    while logger is not None:
        for handler in logger.handlers:
            if found is not None:
                return None
            found = handler
        if not logger.propagate:
            break
        logger = logger.parent
    if found is None or found.filters or found.level > logging.INFO or not hasattr(found, "write_line"):
        return None
    return found
