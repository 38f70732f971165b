"""Text from files (tensor names, metadata, messages that quote them) made safe to show on a terminal.

A tensor named ``"\\x1b]0;pwned\\x07"`` or ``"\\x1b[2J"`` must not retitle or clear the user's terminal, and
``"\\r"`` or ``"\\b"`` must not overwrite what was printed before it: control characters (C0 but tab and,
where allowed, newline; DEL; C1) and the Unicode bidirectional overrides become visible escapes such as
``\\x1b`` and ``\\u202e``. Rich markup (``[bold]``, ``[/]``) is left as text here: the renderer passes cells to
Rich as ``Text``, which never parses markup.
"""

from __future__ import annotations

import re

# C0 controls but \t and \n, DEL, C1 controls, bidi embeddings/overrides/isolates, line/paragraph separators
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_UNSAFE_LINE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def terminal_safe(text: object, newlines: bool = True) -> str:
    """``str(text)`` with every control character that a terminal would act on shown as an escape (``\\x1b``);
    newlines are kept unless ``newlines`` is False (one table cell, one line)."""
    s = str(text)
    return (_UNSAFE if newlines else _UNSAFE_LINE).sub(_escape, s)
