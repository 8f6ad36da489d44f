"""What every package's commands share: the parser that turns mistakes into one-line errors,
help that shows defaults and examples, and the exit code of a usage error."""
from __future__ import annotations

import argparse
import os
import re

from gqa_lut.errors import UsageError

EXIT_USAGE = 2
MAX_WORKERS = max(64, 4 * (os.cpu_count() or 1))  # processes a --workers may ask for
# A number with a leading minus is a value, not an option: argparse alone only knows -1 and -.5
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; every option's default shown unless its help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" not in text and action.option_strings and action.default is not None
                and action.default is not False and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kw)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        raise UsageError(message)


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)
