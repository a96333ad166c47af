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
