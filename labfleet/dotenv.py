"""Quoting for the `.env` file that docker compose reads.

Compose's dotenv parser keeps single-quoted values literally (no `$` interpolation,
no escapes), so that is the form used whenever the value allows it. A value holding a
single quote is double-quoted instead: there compose unescapes backslashes and quotes,
and interpolates `$`, which `$$` turns back into a literal dollar sign.
"""

from __future__ import annotations


def quote(value: object) -> str:
    text = str(value)
    if "\n" in text or "\r" in text or "\0" in text:
        raise ValueError(f"a .env value cannot hold a newline: {text!r}")
    if "'" not in text and not text.endswith("\\"):
        return f"'{text}'"
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$")
    return f'"{escaped}"'


def render(values: dict[str, object]) -> str:
    return "".join(f"{key}={quote(value)}\n" for key, value in values.items())
