"""Which words of a caption can take a colour: DiffColor's identifier rewrite (stage 2).

The rewrite puts an identifier token in front of each word of the caption
``c`` that names a thing ("a dog sitting on a wooden bench" -> "a sks dog
sitting on a wooden sks bench"), giving ``c'``. A colour map then builds its
target by putting colour words in those identifier slots ("a brown dog sitting
on a wooden sks bench"), so target and ``c'`` stay token-aligned. The same
rules decide, before any GPU work, whether a manifest's caption has a word
that can take a colour, whether its colour map names only such words, and
whether the model's prompt fits the text encoder: they live here, once, for the
method and the archive alike.

Which words get an identifier (``IDENTIFIER_RULES``):

- ``"nouns"`` (default; ours): the words that name things. Without a tagger
  model (none ships offline), a lexicon rule decides: a word of letters gets an
  identifier unless it is a function word (:data:`FUNCTION_WORDS`), a colour
  or other adjective (:data:`ADJECTIVES`), a verb form (:data:`VERBS`), an
  ``-ing`` or ``-ed`` form or an ``-ly`` adverb (except the nouns listed in
  :data:`SUFFIX_NOUNS`, and names: capitalised words past the first), or an
  ``-ous``/``-ful``/``-less`` adjective. A colour that is also a thing
  (:data:`COLOUR_NOUNS`: "orange", "silver") is an adjective in front of
  another word ("an orange spacesuit") and a noun otherwise ("an orange on
  a plate"). A hyphenated word is judged by its
  last part (``black-and-white``, ``sepia-toned``: adjectives). A word of
  :data:`VERBS` that is also a noun ("watch", "faces", "stand") counts as a
  noun right after a determiner, number, possessive or preposition ("a
  watch", "with drinks") and as a verb otherwise ("a man faces the sea").
  Words the lexicon does not know count as nouns: an unknown adjective costs a
  token, an unknown noun never loses its slot.
- ``"content"``: every word that is not a function word (the rule before
  ``"nouns"``; verbs and adjectives included).

The model's prompt must also fit the text encoder (77 tokens for SD, start and
end included): :class:`PromptLimit` refuses a longer one naming the words the
encoder would cut off, never truncating silently.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

from diffcolor.common.errors import PromptError, UserError

# ours: words that never get an identifier (function words)
FUNCTION_WORDS = frozenset(
    """a an the of on in at with and or nor but to by for from under over near beside behind between
    into onto upon up down off out about above below across along among around against through during
    before after its it his her their our your my this that these those is are was were be been being
    has have had as some any each every all both no not while who whom which what where when there here
    one two three four five six seven eight nine ten""".split()
)
# ours (rule "nouns"): colour words and common adjectives of captions; never an identifier.
ADJECTIVES = frozenset(
    """red green blue yellow purple pink brown black white gray grey beige crimson scarlet turquoise magenta cyan
    golden silvery dark pale bright deep colourful colorful monochrome sepia faded
    old young new small large big little long short tall wide narrow high low tiny huge great ancient modern
    early late wooden woolen woollen silken leaden oaken earthen empty full bare rural urban local public private
    famous historic historical formal casual traditional royal former main various several many few other another
    same different single double entire whole distant nearby upper lower outer inner central rough smooth clear
    cloudy sunny snowy rainy foggy misty busy quiet elderly proud happy sad serious beautiful pretty plain fancy
    floral wet dry hot cold warm cool fresh clean dirty thin thick heavy flat steep round straight curly wavy wild
    alive asleep awake far handsome elegant simple grand fine broad shallow soft hard dim shiny dull worn torn
    broken frozen fallen hidden sunken striped spotted dotted checked patterned cheerful solemn stern sturdy
    fluffy furry hairy bald bearded blond blonde shaggy open closed very quite rather american british english
    french german greek roman italian spanish dutch chinese japanese indian african european""".split()
)
# ours (rule "nouns"): colour words that are also things ("an orange", "the silver"): an adjective in front of a
# word that can take a colour ("an orange spacesuit"), a noun otherwise ("an orange on a plate").
COLOUR_NOUNS = frozenset(
    """orange silver gold ginger tan cream ivory olive rose lemon lime navy amber copper bronze rust chocolate coral
    khaki lavender maroon mustard peach plum salmon slate teal violet""".split()
)
# ours (rule "nouns"): verb forms of captions. Those that are also nouns (faces, watch, stand) are nouns right
# after a word of NOUN_CONTEXT.
VERBS = frozenset(
    """stand stands stood sit sits sat hold holds held wear wears wore worn smile smiles smiled look looks looked
    pose poses posed walk walks walked run runs ran ride rides rode ridden play plays played carry carries carried
    show shows shown lie lies lay lain lean leans wait waits work works eat eats ate eaten drink drinks drank
    drunk read reads watch watches pull pulls push pushes talk talks face faces gather gathers sail sails fly flies
    flew flown grow grows grew grown hang hangs hung cover covers lead leads led drive drives drove driven make
    makes made take takes took taken see sees seen build builds built lay lays laid set sets put puts get gets got
    go goes went gone come comes came give gives gave given keep keeps kept leave leaves meet meets met feed
    feeds fed dig digs dug sweep sweeps swept kneel kneels knelt climb climbs cross crosses fish fishes wash washes
    cook cooks paint paints point points wave waves hug hugs kiss kisses dance dances sing sings sang sung swim
    swims swam jump jumps throw throws threw thrown catch catches caught sell sells sold buy buys bought stare
    stares gaze gazes rest rests lie overlook overlooks surround surrounds line lines fill fills""".split()
)
# Words after which a word of VERBS is a noun: determiners, numbers, possessives, prepositions.
NOUN_CONTEXT = frozenset(
    """a an the this these those some any each every all both no its his her their our your my one two three four
    five six seven eight nine ten of on in at with by for from under over near beside behind between into onto upon
    about above below across along among around against through during before after""".split()
)
# ours (rule "nouns"): nouns that look like an -ing or -ed form or an -ly adverb.
SUFFIX_NOUNS = frozenset(
    """building painting clothing ceiling wedding morning evening awning railing stocking string spring swing thing
    king ring wing sling sibling pudding dumpling clearing landing bedding carving drawing engraving etching siding
    lining icing shilling herring darling duckling seedling sapling offspring lightning fencing paving scaffolding
    roofing earring gathering meeting dwelling crossing opening setting lodging ironing washing planking housing
    bed shed sled seed weed reed steed creed speed deed need feed tweed breed shred hundred sled
    family jelly belly holly lily ally bully rally folly gully butterfly dragonfly firefly assembly supply reply
    italy sicily anomaly monopoly dolly trolley""".split()
)
IDENTIFIER_RULES = ("nouns", "content")
# A word (letters first, then letters, digits, apostrophes or hyphens), a number, or one punctuation mark.
WORD_PATTERN = re.compile(r"[^\W\d_][\w'-]*|\d+|[^\w\s]", re.UNICODE)


@dataclass(frozen=True)
class RewrittenCaption:
    """``c'``: the caption with an identifier before each word that can take a colour.

    Which caption words have a slot is read from ``text`` itself (the word
    after each identifier), so a ``c'`` stored under an earlier rule keeps its
    own slots.
    """

    caption: str  # c, as given
    text: str  # c'
    identifier: str
    slots: tuple[str, ...]  # the words that got an identifier, lower-case, in order

    @classmethod
    def stored(cls, caption: str, text: str, identifier: str = "sks") -> "RewrittenCaption":
        """The ``c'`` of a record or state (``caption`` and its stored rewrite ``text``), its slots read from ``text``."""
        words = WORD_PATTERN.findall(caption)
        found = cls(caption=caption, text=text, identifier=identifier, slots=())
        return cls(caption=caption, text=text, identifier=identifier,
                   slots=tuple(words[index].lower() for index in found.positions))

    @cached_property
    def positions(self) -> tuple[int, ...]:
        """Indices into ``WORD_PATTERN.findall(caption)`` of the words that have an identifier in front."""
        pieces = self.text.split(" ")
        found: list[int] = []
        at = 0
        for index, word in enumerate(WORD_PATTERN.findall(self.caption)):
            if word != self.identifier and at + 1 < len(pieces) and pieces[at] == self.identifier and pieces[at + 1] == word:
                found.append(index)
                at += 1
            at += 1
        return tuple(found)


def _is_name(word: str, index: int) -> bool:
    """A capitalised word past the caption's first: a name, whatever its ending."""
    return index > 0 and word[0].isupper()


def _names_a_thing(words: list[str], index: int) -> bool:
    """Rule "nouns" for ``words[index]`` (see the module docstring)."""
    word = words[index]
    lower = word.lower()
    last = lower.rsplit("-", 1)[-1] or lower
    if lower in ADJECTIVES or last in ADJECTIVES:
        return False
    if lower in COLOUR_NOUNS:
        following = words[index + 1] if index + 1 < len(words) else ""
        return not (following[:1].isalpha() and following.lower() not in FUNCTION_WORDS)
    if lower in VERBS:
        previous = words[index - 1].lower() if index > 0 else ""
        return index == 0 or previous in NOUN_CONTEXT or previous.endswith(("'s", "s'"))
    if _is_name(word, index) or last in SUFFIX_NOUNS or lower in SUFFIX_NOUNS:
        return True
    if last.endswith("ings"):  # paintings, buildings: a plural noun (no verb form ends so)
        return True
    if len(last) > 4 and last.endswith(("ing", "ed", "ous", "ful", "less")):
        return False
    if len(last) > 4 and last.endswith("ly"):
        return False
    return True


def _slot_positions(words: list[str], identifier: str, rule: str) -> list[int]:
    """Indices of the words of ``words`` that get an identifier under ``rule``."""
    if rule not in IDENTIFIER_RULES:
        raise UserError(f"identifier rule must be one of {', '.join(IDENTIFIER_RULES)}, got {rule!r}")
    content = [index for index, word in enumerate(words)
               if word[0].isalpha() and word.lower() not in FUNCTION_WORDS and word.lower() != identifier.lower()]
    if rule == "content":
        return content
    return [index for index in content if _names_a_thing(words, index)]


def rewrite_caption(caption: str, identifier: str = "sks", rule: str = "nouns") -> RewrittenCaption:
    """Puts ``identifier`` before every word of ``caption`` that ``rule`` gives a slot (see the module docstring).

    Raises PromptError when no word gets one, ValueError for an unknown rule.
    """
    words = WORD_PATTERN.findall(caption)
    positions = set(_slot_positions(words, identifier, rule))
    pieces: list[str] = []
    for index, word in enumerate(words):
        if index in positions:
            pieces.append(identifier)
        pieces.append(word)
    if not positions:
        content = _slot_positions(words, identifier, "content")
        raise PromptError(f"caption {caption!r} has no word that names a thing to attach colours to (its content "
                          f"words {', '.join(repr(words[i]) for i in content)} name none)" if content
                          else f"caption {caption!r} has no content word to attach colours to")
    return RewrittenCaption(caption=caption, text=" ".join(pieces), identifier=identifier,
                            slots=tuple(words[index].lower() for index in sorted(positions)))


def color_map_slots(rewritten: RewrittenCaption, color_map: dict[str, str]) -> dict[int, str]:
    """The colour of each identifier slot (by index) that ``color_map`` names by its word.

    ``{"dog": "brown"}`` on "a sks dog on a sks bench" gives ``{0: "brown"}``;
    a word that occurs twice colours both slots. Raises PromptError naming a
    key that cannot take a colour (and the words that can), or an empty colour.
    """
    wanted = {key.strip().lower(): value.strip() for key, value in color_map.items()}
    for key, value in wanted.items():
        if key not in rewritten.slots:
            eligible = ", ".join(repr(word) for word in dict.fromkeys(rewritten.slots))
            in_caption = key in {word.lower() for word in WORD_PATTERN.findall(rewritten.caption)}
            why = ("is in the caption but names no thing (identifiers go before the words that name things)"
                   if in_caption else "is not a content word of the caption")
            raise PromptError(f"colour map key {key!r} {why}; the words that can take a colour are {eligible}")
        if not value:
            raise PromptError(f"colour map gives an empty colour for {key!r}")
    return {index: wanted[word] for index, word in enumerate(rewritten.slots) if word in wanted}


def slot_prompt(rewritten: RewrittenCaption, colors: dict[int, str]) -> str:
    """The model's prompt: ``c'`` with the identifier of each slot in ``colors`` replaced by its colour.

    ``{0: "brown"}`` on "a sks dog on a sks bench" gives "a brown dog on a sks bench":
    token for token aligned with ``c'`` when every colour is one token.
    """
    slot_of = {position: slot for slot, position in enumerate(rewritten.positions)}
    pieces: list[str] = []
    for index, word in enumerate(WORD_PATTERN.findall(rewritten.caption)):
        if index in slot_of:
            pieces.append(colors.get(slot_of[index], rewritten.identifier))
        pieces.append(word)
    return " ".join(pieces)


# ours: adjectives that follow a colour in English ("a brown wooden bench", "a red French car"): a colour
# goes in front of them, as it goes in front of a noun that modifies the coloured word ("a yellow grass field").
AFTER_COLOUR = frozenset(
    """wooden woolen woollen silken leaden oaken earthen golden american british english french german greek roman
    italian spanish dutch chinese japanese indian african european""".split()
)


def _article_for(word: str) -> str:
    """"an" before a word that starts with a vowel sound ("an orange", "an ivory"), "a" otherwise."""
    lower = word.lower()
    if lower.startswith(("uni", "use", "usu", "eu", "one", "once")):
        return "a"  # a yellow-sounding vowel: "a unicorn", "a European"
    return "an" if lower[:1] in set("aeiou") else "a"


def colored_caption(rewritten: RewrittenCaption, colors: dict[int, str]) -> str:
    """The prompt for people: the caption as written, with each slot's colour in ``colors`` in good English.

    ``{0: "brown"}`` on "A dog, on a bench." gives "A brown dog, on a bench.": no
    identifier token and the caption's own spacing and punctuation. The colour
    goes in front of what English puts after a colour, nouns that modify the
    coloured word and material or origin adjectives ("a grass field" -> "a
    yellow grass field", "a wooden bench" -> "a brown wooden bench"), and the
    article before it agrees with it ("a spacesuit" -> "an orange spacesuit").
    The model's own prompt (:func:`slot_prompt`) keeps the identifier slots.
    """
    matches = list(WORD_PATTERN.finditer(rewritten.caption))
    words = [match.group() for match in matches]
    slot_of = {position: slot for slot, position in enumerate(rewritten.positions)}
    colored = {position for position, slot in slot_of.items() if slot in colors}
    inserted: dict[int, str] = {}  # word index -> colour put in front of it
    for position in sorted(colored):
        at = position
        while at > 0 and at - 1 not in colored and (
                at - 1 in slot_of or words[at - 1].lower() in AFTER_COLOUR):
            at -= 1
        inserted[at] = colors[slot_of[position]]
    pieces: list[str] = []
    end = 0
    for index, match in enumerate(matches):
        # The article before a colour agrees with the colour ("an orange spacesuit", "a red apple").
        if index + 1 in inserted and words[index].lower() in ("a", "an"):
            article = _article_for(inserted[index + 1])
            pieces.append(rewritten.caption[end : match.start()] + (article.capitalize() if words[index][0].isupper()
                                                                     else article))
            end = match.end()
        if index in inserted:
            pieces.append(rewritten.caption[end : match.start()] + inserted[index] + " ")
            end = match.start()
    pieces.append(rewritten.caption[end:])
    return "".join(pieces).strip()


def prompt_slots(rewritten: RewrittenCaption, target: str) -> dict[int, str]:
    """The colours a free target prompt puts before the caption's content words, by slot.

    The target must be the caption with words added in front of slot words
    and no other word changed (case, spacing, punctuation and "a"/"an" aside: the
    model's prompt keeps the caption's): "a brown dog on a green bench" for "A dog on a
    bench." gives ``{0: "brown", 1: "green"}``. Raises PromptError saying where
    the target departs from the caption otherwise.
    """
    all_words = WORD_PATTERN.findall(rewritten.caption)
    kept = [index for index, word in enumerate(all_words) if word[0].isalnum()]  # punctuation aside
    words = [all_words[index] for index in kept]
    slot_at = {position: slot for slot, position in enumerate(rewritten.positions)}
    slot_of = {position: slot_at[index] for position, index in enumerate(kept) if index in slot_at}
    added = [word for word in WORD_PATTERN.findall(target) if word[0].isalnum()]
    def key(word: str) -> str:  # "an orange spacesuit" for "a spacesuit": the article may agree with the colour
        lower = word.lower()
        return "a" if lower == "an" else lower

    matcher = difflib.SequenceMatcher(None, [key(w) for w in words], [key(w) for w in added], autojunk=False)
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
            raise PromptError(f"it adds '{inserted}' {where}, which is not in front of a word that can take a colour "
                              f"({', '.join(repr(word) for word in dict.fromkeys(rewritten.slots))})")
        colors[slot_of[i1]] = inserted
    return colors


def build_target_prompt(rewritten: RewrittenCaption, color_map: dict[str, str]) -> str:
    """The model's target prompt of a colour map: each mapped word's identifier replaced by its colour.

    ``{"dog": "brown"}`` on "a sks dog on a sks bench" gives "a brown dog on a
    sks bench". Raises PromptError naming a key that cannot take a colour
    (and the words that can), or an empty colour.
    """
    return slot_prompt(rewritten, color_map_slots(rewritten, color_map))


def describe_color_map(rewritten: RewrittenCaption, color_map: dict[str, str]) -> str:
    """A colour map as people read it: the caption with the colours in front of their words."""
    return colored_caption(rewritten, color_map_slots(rewritten, color_map))


# ---------------------------------------------------------------------------
# The text encoder's length: never truncate silently.


@dataclass(frozen=True)
class PromptLimit:
    """How long a prompt the text encoder reads whole: ``tokenize`` (BPE pieces, no start or end token) and ``limit``.

    ``limit`` is the pieces that fit between the start and end tokens
    (``model_max_length - 2``: 75 for SD). The method builds one from the
    model's tokenizer (:func:`diffcolor.method.diffusion.prompt_limit`).
    """

    tokenize: Callable[[str], list[str]]
    limit: int
    model_max_length: int

    def problem(self, text: str, what: str, hide: str | None = None) -> str | None:
        """None when ``text`` fits; else one line naming its length and the words the encoder would cut off.

        ``hide`` (an identifier token) is left out of the words shown: people never see it.
        """
        pieces = self.tokenize(text)
        if len(pieces) <= self.limit:
            return None
        shown = [piece for piece in pieces[self.limit :] if hide is None or piece.replace("</w>", "") != hide]
        lost = "".join(shown).replace("</w>", " ").strip()
        return (f"{what} is {len(pieces) + 2} tokens, over the text encoder's {self.model_max_length}: "
                f"'{lost}' would be cut off; shorten it")

    def check(self, text: str, what: str, hide: str | None = None) -> None:
        """Raises PromptError with :meth:`problem`'s line when ``text`` does not fit."""
        problem = self.problem(text, what, hide)
        if problem is not None:
            raise PromptError(problem)


def prompt_length_problems(limit: PromptLimit, rewritten: RewrittenCaption, color_map: dict[str, str] | None = None,
                           targets: list[str] | tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """``(field, problem)`` for each of an item's model prompts that the text encoder would cut off.

    The caption is checked as ``c'`` (with its identifiers, as stage 2
    encodes it), the colour map as its model prompt (naming the colours
    lost), each free target as written and, when it lines up with the
    caption, as its model prompt.
    """
    problems: list[tuple[str, str]] = []
    hide = rewritten.identifier
    caption = limit.problem(rewritten.text, "the caption with its identifiers", hide)
    if caption is not None:
        problems.append(("caption", caption))
    if color_map:
        try:
            prompt = build_target_prompt(rewritten, color_map)
        except PromptError:
            prompt = None  # the map's own problem is reported where the map is checked
        if prompt is not None and limit.problem(prompt, "") is not None:
            lost = limit.tokenize(prompt)[limit.limit :]
            lost_words = {piece.replace("</w>", "") for piece in lost}
            colours = [f"'{value}' (for '{key}')" for key, value in color_map.items()
                       if value.strip().lower() in lost_words or key.strip().lower() in lost_words]
            problems.append(("color_map", limit.problem(prompt, "the colour map's prompt", hide)
                             + (f" (colours lost: {', '.join(colours)})" if colours else "")))  # the colour or its word cut off
    for number, target in enumerate(targets, start=1):
        found = limit.problem(target, f"target prompt {number}")
        if found is None:
            try:
                found = limit.problem(slot_prompt(rewritten, prompt_slots(rewritten, target)),
                                      f"target prompt {number} in the caption's token positions", hide)
            except PromptError:
                found = None  # rendered as written, which fits
        if found is not None:
            problems.append(("target_prompts", found))
    return problems
