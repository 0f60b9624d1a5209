"""The ``rlhf`` command.

    rlhf validate-data FILE --format sft|preference|prompt|text   list every problem in a dataset file
"""

from __future__ import annotations

import sys
from typing import Sequence

USAGE = """usage: rlhf COMMAND [ARGS]

commands:
  validate-data FILE --format sft|preference|prompt|text
                   check every row of a dataset as the stages would; exits 1 when it finds a problem
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "validate-data":
        from rlhf.data import validate_data_main

        return validate_data_main(rest)
    sys.stderr.write(f"rlhf: unknown command {command!r}\n{USAGE}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
