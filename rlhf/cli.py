"""The ``rlhf`` command.

    rlhf run PIPELINE.yaml [--from S|--only S] [--force] [--resume] [--dry-run] [S.key=value ...]
                                                                  bring a run up to date, stage by stage
    rlhf validate-data FILE --format sft|preference|prompt|text   list every problem in a dataset file
    rlhf report RUN_DIR                                           plot a run's curves and write its HTML report
    rlhf status RUN_DIR                                           each stage's state, fingerprint and key metrics

Errors the user can fix (``RLHFError``) print one ``error: ...`` line and exit with status 2, as the launchers do.
"""

from __future__ import annotations

import sys
from typing import Sequence

USAGE = """usage: rlhf COMMAND [ARGS]

commands:
  run PIPELINE.yaml [--from STAGE | --only STAGE] [--force] [--resume] [--dry-run] [STAGE.key=value ...]
                   run the stages that are not up to date, each as its own accelerate process, then the report
  validate-data FILE --format sft|preference|prompt|text
                   check every row of a dataset as the stages would; exits 1 when it finds a problem
  report RUN_DIR   write RUN_DIR/report/reward_curves.png and RUN_DIR/report/report.html from the stages' outputs
  status RUN_DIR   each stage: complete / stale / incomplete / missing, fingerprint, when, key metrics
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "run":
        from rlhf.pipeline import pipeline_main

        return pipeline_main(rest)
    if command == "validate-data":
        from rlhf.data import validate_data_main

        return validate_data_main(rest)
    if command == "report":
        from rlhf.errors import RLHFError
        from rlhf.errors import EXIT_USER_ERROR
        from rlhf.report import report_main

        try:
            return report_main(rest)
        except RLHFError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return EXIT_USER_ERROR
    if command == "status":
        from rlhf.errors import RLHFError
        from rlhf.errors import EXIT_USER_ERROR
        from rlhf.pipeline import format_status, run_status

        if len(rest) != 1:
            sys.stderr.write("usage: rlhf status RUN_DIR\n")
            return EXIT_USER_ERROR
        try:
            sys.stdout.write(format_status(run_status(rest[0])) + "\n")
        except RLHFError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return EXIT_USER_ERROR
        return 0
    sys.stderr.write(f"rlhf: unknown command {command!r}\n{USAGE}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
