"""The storage and tracking URLs of a sweep: their forms checked, relative paths resolved, and
:func:`redact_url`, the one place a URL is made safe to print.

Reaching a server is checked when a command starts (:mod:`tlsweep.stores`,
:mod:`tlsweep.tracking`), not here. This module imports neither TensorFlow, Optuna nor MLflow.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tlsweep.errors import first_line

from ._checks import fail

# A URL's user and password in any text: the password runs from the first ":" after "//" to the
# LAST "@" of the same word, so one holding a raw "/", "@", ":" or a %-escape is caught whole.
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)([^\s:/@'\"]*):\S*@")
# libpq's and the drivers' other way to give it: ?password=... or &password=...
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd)=)[^&\s'\"]*", re.IGNORECASE)


def redact_url(text: str, url: str | None = None) -> str:
    """``text`` (a URL, a message, a sweep file) with every URL password replaced by ``***``.

    The one place secrets are made safe to print, log or send to MLflow. ``url``: a URL whose
    password, as the server or driver may quote it (%-escapes decoded), is also hidden
    wherever it appears in ``text``.
    """
    out = _QUERY_PASSWORD.sub(r"\1***", _USERINFO.sub(r"\1\2:***@", text))
    if url:
        for secret in _passwords(url):
            out = out.replace(secret, "***")
    return out


def parse_complaint(url: str, complaint: str) -> str:
    """Why a parser refused ``url``, safe to print: a parser that split a password holding a raw
    ``@`` quotes pieces of it, so with a password only the fix is given."""
    if _passwords(url):
        return "a '@', '/' or ':' in the password must be written %40, %2F, %3A"
    return redact_url(first_line(complaint))


def _no_raw_at(where: str, url: str, field_name: str) -> str:
    """``url``, refused if its password holds a raw ``@``: every URL parser would take what
    follows it for the host (and quote that piece of the password in its errors)."""
    if "@" in (_password(url.partition("?")[0]) or ""):
        raise fail(where, field_name, redact_url(url), "write a '@' in the password as %40")
    return url


def _password(url: str) -> str | None:
    """The password in ``url`` as written: from the first ``:`` after ``//`` to the last ``@``."""
    m = re.match(r"[A-Za-z][A-Za-z0-9+.\-]*://[^:/@]*:(\S*)@", url.strip())
    return m.group(1) if m and m.group(1) else None


def _passwords(url: str) -> set[str]:
    """The password in ``url`` as written and %-decoded (empty when it has none)."""
    from urllib.parse import unquote

    p = _password(url)
    return {p, unquote(p)} - {"", "***"} if p else set()


# The tracking URIs MLflow 3.17 builds a store for (mlflow/tracking/_tracking_service/utils.py):
# a local path or file:, a database through SQLAlchemy, a tracking server, or Databricks.
TRACKING_DATABASES = ("postgresql", "mysql", "sqlite", "mssql")
TRACKING_SCHEMES = ("file", "http", "https", "databricks", "databricks-uc", "uc")
_TRACKING_ALLOWED = (
    "expected a folder path, file:///DIR, sqlite:///FILE, postgresql://, mysql://, mssql://, "
    "http(s)://HOST:PORT or databricks"
)


def check_tracking_uri(where: str, uri: Any, field_name: str) -> str:
    """Check an MLflow tracking URI's form (reaching it is checked when a command starts)."""
    from urllib.parse import urlsplit

    if not isinstance(uri, str) or not uri.strip():
        raise fail(where, field_name, uri, _TRACKING_ALLOWED)
    uri = uri.strip()
    if uri.startswith("postgres://"):  # neither MLflow nor SQLAlchemy 2 take this alias
        uri = "postgresql://" + uri[len("postgres://") :]
    if uri in ("databricks", "databricks-uc", "uc"):
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        raise fail(where, field_name, redact_url(uri), _TRACKING_ALLOWED) from None
    scheme = parts.scheme.lower()
    if "://" not in uri and ":" in uri.split("/", 1)[0]:
        scheme = uri.split(":", 1)[0].lower()  # e.g. "bogus:x"
    elif "://" not in uri:
        scheme = ""  # a plain folder path
    if scheme in ("", "file"):
        return uri
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise fail(where, field_name, redact_url(uri), "expected http(s)://HOST[:PORT]")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise fail(where, field_name, redact_url(uri), "the port must be a number") from None
        return _no_raw_at(where, uri, field_name)
    if scheme.partition("+")[0] in TRACKING_DATABASES:
        if scheme.startswith("sqlite") and parts.path.lstrip("/") in ("", ":memory:"):
            raise fail(where, field_name, uri, "use a file: sqlite:///mlflow.db")
        if not scheme.startswith("sqlite") and not parts.hostname and "host=" not in parts.query:
            raise fail(where, field_name, redact_url(uri), "expected DIALECT://USER@HOST/DB")
        return _no_raw_at(where, uri, field_name)
    if scheme in TRACKING_SCHEMES:
        return uri
    raise fail(where, field_name, redact_url(uri), _TRACKING_ALLOWED)


# The SQLAlchemy dialects whose worker lock tlsweep implements (workers.storage_lock:
# pg_advisory_lock, GET_LOCK); other databases Optuna could use (oracle, mssql, cockroachdb) are
# refused, since N workers there could not agree on who runs the last trials.
_DATABASES = ("postgresql", "postgres", "mysql", "mariadb")


def check_storage_url(where: str, url: Any, base: Path, field_name: str) -> str:
    """Resolve a storage URL: a relative SQLite or journal path is made absolute against base."""
    if not isinstance(url, str) or not url:
        raise fail(where, field_name, url, "expected an Optuna storage URL like sqlite:///x.db")
    if url.startswith("sqlite:///"):
        rest = url[len("sqlite:///") :]
        if rest in ("", ":memory:"):
            raise fail(where, field_name, url, "use a file: sqlite:///tlsweep.db")
        p = Path(rest).expanduser()
        if not p.is_absolute():
            p = (base / p).resolve()
        return f"sqlite:///{p}"
    if url.startswith("journal:"):
        p = Path(url[len("journal:") :]).expanduser()
        if not p.is_absolute():
            p = (base / p).resolve()
        return f"journal:{p}"
    if url.startswith("postgres://"):  # SQLAlchemy 2 dropped this alias of postgresql://
        url = "postgresql://" + url[len("postgres://") :]
    scheme = url.partition("://")[0].partition("+")[0] if "://" in url else None
    if scheme not in _DATABASES:
        raise fail(
            where,
            field_name,
            redact_url(url),  # no password in the message
            "expected sqlite:///FILE, journal:FILE, postgresql://... or mysql://... (the "
            "storages whose worker lock tlsweep implements)",
        )
    return _no_raw_at(where, url, field_name)
