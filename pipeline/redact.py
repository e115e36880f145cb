"""Keep credentials out of what facecap stores and prints.

Keys belong in environment variables (``api_key_env``, the AWS variables). One written into a
URL instead (``http://user:key@host/v1``, ``?api_key=...``, a presigned ``X-Amz-Signature``)
would otherwise be copied into ``_manifest.json``, ``_failed/*.json``, row errors, reports and
the terminal. ``redact_text`` masks, in every URL of a text, the user-info and the values of
query or fragment parameters named like secrets, and ``Bearer``/``Basic`` credentials;
``redact`` does that to every string of a JSON-like value and also masks the string value of a
mapping key named like a secret (``api_key: sk-...``, not ``api_key_env: OPENAI_API_KEY``).

What is hashed is never redacted: a config's hash is computed from the real values, so changing
a key embedded in a URL still changes the hash and refuses to mix old and new shards.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "REDACTED"
# A name is secret when its last word (split at - _ .) is one of these: api_key, X-Amz-Signature,
# X-Amz-Credential, X-Amz-Security-Token, access_token, client_secret, sig; not api_key_env,
# max_tokens or token_type.
SECRET_WORDS = frozenset(
    {
        "apikey",
        "auth",
        "authorization",
        "credential",
        "credentials",
        "jwt",
        "key",
        "passwd",
        "password",
        "pwd",
        "secret",
        "sig",
        "signature",
        "token",
    }
)
# A URL ends at a space or a quote, and not with the punctuation of the sentence around it.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]*[^\s'\"<>`,.:;)\]]")
_PARAM = re.compile(r"([?&;#])([^=&;#?\s]+)=([^&;#\s]*)")
# "Bearer <token>" anywhere; "Basic <credentials>" only in an Authorization header ("Basic
# Constraints" is an X.509 extension in TLS errors).
_SCHEME_CREDENTIALS = re.compile(r"(\bBearer\s+|\bAuthorization\s*:\s*Basic\s+)[A-Za-z0-9._~+/-]{8,}=*", re.IGNORECASE)


def secret_name(name: str) -> bool:
    """Whether a parameter or key called ``name`` holds a secret (its last word says so)."""
    words = re.split(r"[-_.]", name.strip().lower())
    return words[-1] in SECRET_WORDS


def redact_url(url: str) -> str:
    """``url`` with its user-info and secret parameters masked; the rest as it was."""
    scheme, sep, rest = url.partition("://")
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if "@" in authority:
        authority = f"{MASK}@{authority.rsplit('@', 1)[1]}"
    tail = _PARAM.sub(lambda m: f"{m[1]}{m[2]}={MASK}" if secret_name(m[2]) and m[3] else m[0], tail)
    return f"{scheme}{sep}{authority}{tail}"


def redact_text(text: str) -> str:
    """Every URL of ``text`` redacted, and credentials after ``Bearer``/``Basic``."""
    if "://" in text:
        text = _URL.sub(lambda m: redact_url(m[0]), text)
    return _SCHEME_CREDENTIALS.sub(lambda m: f"{m[1]}{MASK}", text)


def redact(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings, numbers) with every string redacted."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {
            key: MASK if isinstance(item, str) and item and secret_name(str(key)) else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact(item) for item in value)
    return value
