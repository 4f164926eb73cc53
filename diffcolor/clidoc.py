"""``python -m diffcolor.clidoc > docs/CLI.md``: the command-line reference, written from the parser itself.

Every command, its arguments, their defaults, choices and help, and its examples come from
:func:`diffcolor.cli.build_parser`, so the reference cannot drift from the code: ``tests/test_docs.py``
regenerates it and fails when ``docs/CLI.md`` differs. The text is built from the parser's actions,
not from ``format_help``, whose wrapping depends on the terminal and whose layout changes between
Python versions.
"""

from __future__ import annotations

import argparse
import sys

HEADER = """\
# Command-line reference

Generated from the parser (`diffcolor/cli.py`) by `python -m diffcolor.clidoc > docs/CLI.md` (`make cli-doc`);
`tests/test_docs.py` fails when this file is out of date, so do not edit it by hand.
What the commands are for: the [README](../README.md); the design they implement:
[DESIGN.md §10](DESIGN.md#10-interfaces).
"""


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, list[str], argparse.ArgumentParser]]:
    """``(name, help, aliases, parser)`` of each subcommand, in the order they were added."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            seen: dict[int, int] = {}
            for name, sub in action.choices.items():
                if id(sub) in seen:
                    found[seen[id(sub)]][2].append(name)
                    continue
                seen[id(sub)] = len(found)
                found.append((name, helps.get(name, ""), [], sub))
    return found


def _help(action: argparse.Action, prog: str) -> str:
    """The action's help with ``%(default)s`` and the like filled in, as argparse does."""
    if not action.help:
        return ""
    params = {key: value for key, value in vars(action).items() if value is not argparse.SUPPRESS}
    params["prog"] = prog
    for key, value in list(params.items()):
        if hasattr(value, "__name__"):
            params[key] = value.__name__
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(choice) for choice in params["choices"])
    return action.help % params


def _metavar(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    name = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return {"?": f"[{name}]", "*": f"[{name} ...]", "+": f"{name} [{name} ...]"}.get(action.nargs, name)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _row(action: argparse.Action, prog: str) -> str:
    metavar = _metavar(action)
    names = ", ".join(f"`{option}`" for option in action.option_strings) or f"`{metavar}`"
    if action.option_strings and metavar:
        names += f" `{metavar}`"
    what = _help(action, prog)
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        what += f" (one of: {', '.join(f'`{choice}`' for choice in action.choices)})"
    if isinstance(action, argparse._AppendAction) and "repeat" not in what.lower():
        what += " (repeatable)"
    default = ""
    if action.option_strings and not action.required and action.nargs != 0 and action.default not in (None, [], ()):
        default = f"`{action.default}`"
    required = "yes" if action.required or not action.option_strings else ""
    return f"| {names} | {required} | {default} | {_cell(what)} |"


def _synopsis(prog: str, parser: argparse.ArgumentParser) -> str:
    words = [prog]
    optional = False
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            words.append("COMMAND")
        elif not action.option_strings:
            words.append(_metavar(action))
        elif action.required:
            words.append(f"{action.option_strings[-1]} {_metavar(action)}".strip())
        else:
            optional = True
    return " ".join(words + (["[options]"] if optional else []))


def _command(prog: str, help_text: str, aliases: list[str], parser: argparse.ArgumentParser, level: int) -> list[str]:
    lines = [f"{'#' * level} {prog}", ""]
    about = parser.description or help_text
    if about:
        lines += [_cell(about[0].upper() + about[1:]) + ("" if about.endswith(".") else "."), ""]
    if aliases:
        lines += ["Also spelled: " + ", ".join(f"`{alias}`" for alias in aliases) + ".", ""]
    lines += ["```", _synopsis(prog, parser), "```", ""]
    rows = [_row(action, prog) for action in parser._actions
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
            and action.help != argparse.SUPPRESS]
    if rows:
        lines += ["| argument | required | default | what |", "| --- | --- | --- | --- |", *rows, ""]
    for group in parser._mutually_exclusive_groups:
        options = ", ".join(f"`{action.option_strings[0]}`" for action in group._group_actions if action.option_strings)
        lines += [f"{'Exactly' if group.required else 'At most'} one of {options}.", ""]
    if parser.epilog:
        lines += ["```", parser.epilog.rstrip(), "```", ""]
    for name, sub_help, sub_aliases, sub in subcommands(parser):
        lines += _command(f"{prog} {name}", sub_help, sub_aliases, sub, min(level + 1, 4))
    return lines


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole reference as Markdown."""
    if parser is None:
        from diffcolor.cli import build_parser

        parser = build_parser()
    names = [name for name, *_ in subcommands(parser)]
    contents = " · ".join(f"[{name}](#diffcolor-{name})" for name in names)
    lines = [HEADER, f"Commands: {contents}", ""]
    lines += _command(parser.prog, "", [], parser, 2)
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
