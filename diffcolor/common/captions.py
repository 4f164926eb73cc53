"""Which words of a caption can take a colour: DiffColor's identifier rewrite (stage 2).

The rewrite puts an identifier token in front of each content word of the
caption ``c`` ("a dog on a bench" -> "a sks dog on a sks bench"), giving
``c'``. A colour map then builds its target by putting colour words in those
identifier slots ("a brown dog on a sks bench"), so target and ``c'`` stay
token-aligned. The same rules decide, before any GPU work, whether a
manifest's caption has a content word and whether its colour map names only
content words: they live here, once, for the method and the archive alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from diffcolor.common.errors import PromptError

# ours: words that never get an identifier (function words); everything else alphabetic is a content word
FUNCTION_WORDS = frozenset(
    """a an the of on in at with and or nor but to by for from under over near beside behind between
    into onto upon up down off out about above below across along among around against through during
    before after its it his her their our your my this that these those is are was were be been being
    has have had as some any each every all both no not while who whom which what where when there here
    one two three four five six seven eight nine ten""".split()
)
# A word (letters first, then letters, digits, apostrophes or hyphens), a number, or one punctuation mark.
WORD_PATTERN = re.compile(r"[^\W\d_][\w'-]*|\d+|[^\w\s]", re.UNICODE)


@dataclass(frozen=True)
class RewrittenCaption:
    """``c'``: the caption with an identifier before each content word."""

    caption: str  # c, as given
    text: str  # c'
    identifier: str
    slots: tuple[str, ...]  # the content words that got an identifier, lower-case, in order


def rewrite_caption(caption: str, identifier: str = "sks") -> RewrittenCaption:
    """Puts ``identifier`` before every content word of ``caption``.

    Raises PromptError when the caption has no content word.
    """
    pieces: list[str] = []
    slots: list[str] = []
    for word in WORD_PATTERN.findall(caption):
        if word[0].isalpha() and word.lower() not in FUNCTION_WORDS and word.lower() != identifier:
            pieces.append(identifier)
            slots.append(word.lower())
        pieces.append(word)
    if not slots:
        raise PromptError(f"caption {caption!r} has no content word to attach colours to")
    return RewrittenCaption(caption=caption, text=" ".join(pieces), identifier=identifier, slots=tuple(slots))


def build_target_prompt(rewritten: RewrittenCaption, color_map: dict[str, str]) -> str:
    """The target prompt of a colour map: each mapped word's identifier replaced by its colour.

    ``{"dog": "brown"}`` on "a sks dog on a sks bench" gives "a brown dog on a
    sks bench". Raises PromptError naming a key that is not a content word of
    the caption, or an empty colour.
    """
    wanted = {key.strip().lower(): value.strip() for key, value in color_map.items()}
    for key, value in wanted.items():
        if key not in rewritten.slots:
            raise PromptError(f"colour map key {key!r} is not a content word of the caption; use one of {sorted(set(rewritten.slots))}")
        if not value:
            raise PromptError(f"colour map gives an empty colour for {key!r}")
    pieces = rewritten.text.split(" ")
    for index in range(len(pieces) - 1):
        if pieces[index] == rewritten.identifier and pieces[index + 1].lower() in wanted:
            pieces[index] = wanted[pieces[index + 1].lower()]
    return " ".join(pieces)
