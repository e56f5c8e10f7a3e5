"""Keeping credentials out of everything data_gen shows or writes.

Secrets enter through two doors only: the base URL (user:password@host) and the API key's variable.
URLs are shown without their user:password@ part. Text that comes from the server or from the HTTP
library (error bodies, exception messages) may quote what it was sent, so it is scrubbed of every form
of the secrets before it goes into a message, a log line or a file.
"""
from __future__ import annotations

import base64
import re
import urllib.parse

MASK = "***"

# scheme://userinfo@ in free text; greedy up to the last @ before the path, as a password may hold an @.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s]*@")


def without_credentials(url: str) -> str:
    """The URL as it may be written down: no user:password@ part."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def hide_url_credentials(text: str) -> str:
    """Free text (e.g. argparse quoting the command line) with every URL's user:password@ taken out."""
    return _URL_USERINFO.sub(r"\1", text)


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(the URL without user:password@, the user, the password), percent-decoded as HTTP basic auth
    sends them; (url, None, None) for a URL without credentials."""
    netloc = urllib.parse.urlsplit(url).netloc
    if "@" not in netloc:
        return url, None, None
    user, has_password, password = netloc.rpartition("@")[0].partition(":")
    return (without_credentials(url), urllib.parse.unquote(user),
            urllib.parse.unquote(password) if has_password else None)


def basic_auth_token(user: str, password: str | None) -> str:
    """The credentials of HTTP basic auth (RFC 7617, UTF-8) as the header carries them."""
    return base64.b64encode(f"{user}:{password or ''}".encode()).decode("ascii")


class Redactor:
    """Replaces each secret in a text by ***: the API key, the URL's user and password (as written in the
    URL and percent-decoded) and their basic-auth token."""

    def __init__(self, api_key: str | None = None, url: str | None = None):
        secrets = {api_key}
        if url is not None:
            _, user, password = split_credentials(url)
            if user is not None:
                userinfo = urllib.parse.urlsplit(url).netloc.rpartition("@")[0]
                secrets |= {user, password, *userinfo.partition(":")[::2],
                            basic_auth_token(user, password)}
        # Longest first, so that a secret holding another is masked whole.
        self._secrets = sorted((s for s in secrets if s), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = hide_url_credentials(text)
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text
