"""The one exception type that means "the user gave us something wrong".

Anything raised as :class:`UsageError` ends the command with exit status 2 and a single
``error: ...`` line on stderr (see ``cli.main``); everything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input: flags, config file, data files, checkpoints or environment.

    The message must say what is wrong *and* how to fix it, on one line.
    """

    exit_code = 2


def comma_list(flag: str, text: str, example: str) -> list[str]:
    """The items of a comma-separated flag value, stripped; an empty item (``4K,,1M``, a
    trailing comma) or an item given twice is a :class:`UsageError`, not silently dropped."""
    items = [s.strip() for s in text.split(",")]
    if not any(items):
        raise UsageError(f"{flag} is empty; give e.g. {example}")
    if not all(items):
        raise UsageError(f"{flag} {text!r} has an empty item (two commas, or one at an end); "
                         f"give e.g. {example}")
    twice = sorted({s for s in items if items.count(s) > 1})
    if twice:
        raise UsageError(f"{flag} {text!r} names {', '.join(twice)} more than once; give each "
                         "once")
    return items
