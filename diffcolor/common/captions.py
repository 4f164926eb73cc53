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

import difflib
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


def _is_slot(word: str, identifier: str) -> bool:
    """Whether a caption word gets an identifier: a content word (not a function word, not the identifier)."""
    return word[0].isalpha() and word.lower() not in FUNCTION_WORDS and word.lower() != identifier


def rewrite_caption(caption: str, identifier: str = "sks") -> RewrittenCaption:
    """Puts ``identifier`` before every content word of ``caption``.

    Raises PromptError when the caption has no content word.
    """
    pieces: list[str] = []
    slots: list[str] = []
    for word in WORD_PATTERN.findall(caption):
        if _is_slot(word, identifier):
            pieces.append(identifier)
            slots.append(word.lower())
        pieces.append(word)
    if not slots:
        raise PromptError(f"caption {caption!r} has no content word to attach colours to")
    return RewrittenCaption(caption=caption, text=" ".join(pieces), identifier=identifier, slots=tuple(slots))


def color_map_slots(rewritten: RewrittenCaption, color_map: dict[str, str]) -> dict[int, str]:
    """The colour of each identifier slot (by index) that ``color_map`` names by its word.

    ``{"dog": "brown"}`` on "a sks dog on a sks bench" gives ``{0: "brown"}``;
    a word that occurs twice colours both slots. Raises PromptError naming a
    key that is not a content word of the caption, or an empty colour.
    """
    wanted = {key.strip().lower(): value.strip() for key, value in color_map.items()}
    for key, value in wanted.items():
        if key not in rewritten.slots:
            raise PromptError(f"colour map key {key!r} is not a content word of the caption; use one of {sorted(set(rewritten.slots))}")
        if not value:
            raise PromptError(f"colour map gives an empty colour for {key!r}")
    return {index: wanted[word] for index, word in enumerate(rewritten.slots) if word in wanted}


def slot_prompt(rewritten: RewrittenCaption, colors: dict[int, str]) -> str:
    """The model's prompt: ``c'`` with the identifier of each slot in ``colors`` replaced by its colour.

    ``{0: "brown"}`` on "a sks dog on a sks bench" gives "a brown dog on a sks bench":
    token for token aligned with ``c'`` when every colour is one token.
    """
    pieces: list[str] = []
    slot = 0
    for word in WORD_PATTERN.findall(rewritten.caption):
        if _is_slot(word, rewritten.identifier):
            pieces.append(colors.get(slot, rewritten.identifier))
            slot += 1
        pieces.append(word)
    return " ".join(pieces)


def colored_caption(rewritten: RewrittenCaption, colors: dict[int, str]) -> str:
    """The prompt for people: the caption as written, each slot in ``colors`` preceded by its colour.

    ``{0: "brown"}`` on "A dog, on a bench." gives "A brown dog, on a bench.": no
    identifier token and the caption's own spacing and punctuation.
    """
    pieces: list[str] = []
    end = 0
    slot = 0
    for match in WORD_PATTERN.finditer(rewritten.caption):
        if _is_slot(match.group(), rewritten.identifier):
            if slot in colors:
                pieces.append(rewritten.caption[end : match.start()] + colors[slot] + " ")
                end = match.start()
            slot += 1
    pieces.append(rewritten.caption[end:])
    return "".join(pieces).strip()


def prompt_slots(rewritten: RewrittenCaption, target: str) -> dict[int, str]:
    """The colours a free target prompt puts before the caption's content words, by slot.

    The target must be the caption with words added in front of content words
    and no other word changed (case, spacing and punctuation aside: the model's
    prompt keeps the caption's): "a brown dog on a green bench" for "A dog on a
    bench." gives ``{0: "brown", 1: "green"}``. Raises PromptError saying where
    the target departs from the caption otherwise.
    """
    words = [word for word in WORD_PATTERN.findall(rewritten.caption) if word[0].isalnum()]
    slot_of: dict[int, int] = {}
    for position, word in enumerate(words):
        if _is_slot(word, rewritten.identifier):
            slot_of[position] = len(slot_of)
    added = [word for word in WORD_PATTERN.findall(target) if word[0].isalnum()]
    matcher = difflib.SequenceMatcher(None, [w.lower() for w in words], [w.lower() for w in added], autojunk=False)
    colors: dict[int, str] = {}
    for operation, i1, i2, j1, j2 in matcher.get_opcodes():
        if operation == "equal":
            continue
        if operation != "insert":
            changed = " ".join(words[i1:i2])
            into = " ".join(added[j1:j2])
            raise PromptError(f"it changes the caption's words ('{changed}' -> '{into}')" if into
                              else f"it leaves out the caption's words '{changed}'")
        inserted = " ".join(added[j1:j2])
        if i1 not in slot_of:
            where = f"before '{words[i1]}'" if i1 < len(words) else "at the end"
            raise PromptError(f"it adds '{inserted}' {where}, which is not in front of a word that can take a colour")
        colors[slot_of[i1]] = inserted
    return colors


def build_target_prompt(rewritten: RewrittenCaption, color_map: dict[str, str]) -> str:
    """The model's target prompt of a colour map: each mapped word's identifier replaced by its colour.

    ``{"dog": "brown"}`` on "a sks dog on a sks bench" gives "a brown dog on a
    sks bench". Raises PromptError naming a key that is not a content word of
    the caption, or an empty colour.
    """
    return slot_prompt(rewritten, color_map_slots(rewritten, color_map))


def describe_color_map(rewritten: RewrittenCaption, color_map: dict[str, str]) -> str:
    """A colour map as people read it: the caption with the colours in front of their words."""
    return colored_caption(rewritten, color_map_slots(rewritten, color_map))
