"""Text shared by the report's parts: HTML escaping and times as people read them."""

from __future__ import annotations

import datetime as dt
import html
from typing import Any


def esc(value: Any) -> str:
    """HTML-escape any value for text or a quoted attribute."""
    return html.escape(str(value), quote=True)


def utc(t: float) -> str:
    """Epoch seconds as UTC text; a value that is no such time (milliseconds, garbage) as itself."""
    try:
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (ValueError, OverflowError, OSError):
        return str(t)
