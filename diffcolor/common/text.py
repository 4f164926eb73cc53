"""The characters a caption, a label or a catalogue field may not hold (docs/DESIGN.md §9).

Control characters (C0 but tab, line feed and carriage return; DEL; C1) reach
a terminal as escape sequences (``ESC [``, BEL) or cut a string (NUL); the
bidirectional formatting characters (embeddings and overrides U+202A-U+202E,
isolates U+2066-U+2069, the marks U+200E, U+200F and U+061C) make text show
in another order than it is read (a caption that displays one thing and
prompts the model with another; "Trojan Source"). ``manifest validate`` names
each such character with its row and column; the builders that take text from
outside (the IIIF importer) clean it with :func:`clean_text`; a problem line
or an error line shows such characters escaped (:func:`escape_controls`), so
that what a file holds can never drive the terminal it is reported on.
"""

from __future__ import annotations

import re

ALLOWED_CONTROLS = "\t\n\r"
BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_CONTROLS = "".join(chr(code) for code in (*range(0x00, 0x20), *range(0x7F, 0xA0)) if chr(code) not in ALLOWED_CONTROLS)
_UNSAFE = re.compile(f"[{re.escape(_CONTROLS + BIDI_CONTROLS)}]")
_SPACE_LIKE = re.compile(f"[{re.escape(_CONTROLS + ALLOWED_CONTROLS)}]")
_BIDI = re.compile(f"[{re.escape(BIDI_CONTROLS)}]")
_ANY_CONTROL = re.compile(f"[{re.escape(_CONTROLS + ALLOWED_CONTROLS + BIDI_CONTROLS)}]")


def unsafe_character(text: str) -> str | None:
    """A description of the first control or bidi character of ``text`` (``"the control character U+001B"``); else None."""
    match = _UNSAFE.search(text)
    if match is None:
        return None
    char = match.group(0)
    kind = "bidirectional formatting character" if char in BIDI_CONTROLS else "control character"
    return f"the {kind} U+{ord(char):04X} at character {match.start() + 1}"


def clean_text(text: str) -> str:
    """``text`` with control characters (tab and newline included) made spaces and bidi characters removed."""
    return _SPACE_LIKE.sub(" ", _BIDI.sub("", text))


def escape_controls(text: str) -> str:
    """``text`` for one line of a terminal: every control (newlines and tabs too) and bidi character escaped (``\\x1b``)."""
    return _ANY_CONTROL.sub(lambda match: match.group(0).encode("unicode_escape").decode("ascii"), text)
