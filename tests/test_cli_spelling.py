"""One spelling in every public name: the American identifiers (colorize, recolor, color_map); the former
British spellings accepted as aliases where users already used them, and never shown."""

from __future__ import annotations

import argparse
import re

import pytest

from diffcolor.cli import build_parser

BRITISH = re.compile(r"colour|recolour|colourise|colorise", re.IGNORECASE)


def _parsers(parser: argparse.ArgumentParser, prefix=()):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*prefix, name))


def test_every_command_and_shown_option_has_the_american_spelling():
    for command, parser in _parsers(build_parser()):
        assert not any(BRITISH.search(word) for word in command), command
        for action in parser._actions:
            shown = [] if action.help == argparse.SUPPRESS else action.option_strings
            assert not [option for option in shown if BRITISH.search(option)], (command, shown)
            assert not BRITISH.search(action.dest), (command, action.dest)
        assert "--colour-map" not in parser.format_help()


@pytest.mark.parametrize("command", [["colorize", "scan.png", "--caption", "a dog", "--out", "o", "--model", "tiny"],
                                     ["recolor", "out/dog"], ["reprocess", "out", "--items", "dog"]])
def test_the_former_colour_map_spelling_is_an_alias(command):
    parser = build_parser()
    assert parser.parse_args([*command, "--colour-map", '{"dog": "red"}']).color_map == '{"dog": "red"}'
    assert parser.parse_args([*command, "--color-map", '{"dog": "red"}']).color_map == '{"dog": "red"}'
