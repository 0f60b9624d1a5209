"""The shared body of every ``launch/<stage>.py``: parse the command line, set up logging, run the stage.

``python -m rlhf.launcher module:function [--config FILE] [key=value ...]`` runs any stage known by import path
(``stages.sft:run`` or a user's ``mypkg.dpo:run``) the same way; the pipeline launches its stages through it.

Errors the user can fix (``RLHFError``: bad config, bad data, missing inputs; running out of memory or disk) print
one message and exit with status 2, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from rlhf.config import REPO_ROOT, field_paths, parse_cli
from rlhf.errors import (EXIT_USER_ERROR, RLHFError, is_out_of_memory, is_storage_failure, out_of_memory_advice,
                         storage_error)
from rlhf.signals import EXIT_INTERRUPTED, StageInterrupted, stop_with_launcher

def default_config_path(stage: str, name: str = "demo") -> Path:
    """``configs/<stage>/<name>.yaml`` of this checkout."""
    return REPO_ROOT / "configs" / stage / f"{name}.yaml"


def launch(
    run: Callable[[Any], Path],
    config_cls: type,
    *,
    default_config: str | Path | None,
    prog: str,
    argv: Sequence[str] | None = None,
) -> int:
    """Run one stage from the command line; returns the process exit status."""
    from rlhf.tracking import dashboard_lines, opened_dashboards, setup_logging

    rank = int(os.environ.get("RANK", "0"))
    # The stage starts a W&B service of its own rather than one a parent process left in the environment, which
    # would stop with that process.
    os.environ.pop("WANDB_SERVICE", None)
    opened_before = len(opened_dashboards())
    stop_with_launcher()
    try:
        cfg = parse_cli(config_cls, argv, default_config=default_config, prog=prog)
        setup_logging(cfg.logging.level, rank=rank)
        output_dir = run(cfg)
    except StageInterrupted as exc:
        sys.stderr.write(f"interrupted: {exc}\n")
        return EXIT_INTERRUPTED
    except RLHFError as exc:
        return _user_error(prog, exc)
    except (OSError, RuntimeError, MemoryError) as exc:
        if is_out_of_memory(exc):
            return _user_error(prog, out_of_memory_advice(exc, field_paths(config_cls)))
        if is_storage_failure(exc):
            return _user_error(prog, storage_error(getattr(exc, "filename", None), exc))
        raise
    if rank == 0:
        sys.stdout.write(f"{cfg.stage}: complete -> {output_dir}\n")
        sys.stdout.writelines(line + "\n" for line in dashboard_lines(opened_dashboards(opened_before)))
    return 0


def _user_error(prog: str, error: Exception | str) -> int:
    logging.getLogger(prog).debug("stopped by a user-facing error", exc_info=True)
    sys.stderr.write(f"error: {error}\n")
    return EXIT_USER_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """``rlhf.launcher TARGET [--config FILE] [key=value ...]``: one stage by its ``module:function``."""
    from rlhf.pipeline import resolve_target

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        sys.stderr.write("usage: python -m rlhf.launcher module:function [--config FILE.yaml] [key.sub=value ...]\n")
        return EXIT_USER_ERROR
    try:
        func, config_cls = resolve_target(args[0])
    except RLHFError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USER_ERROR
    return launch(func, config_cls, default_config=None, prog=f"rlhf.launcher {args[0]}", argv=args[1:])


if __name__ == "__main__":
    sys.exit(main())
