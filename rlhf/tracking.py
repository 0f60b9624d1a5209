"""One metrics logger for every stage: JSONL always, W&B (online or offline) and TensorBoard on request.

Files a `Tracker` writes (main process only):

``<output_dir>/metrics.jsonl``
    One JSON object per line, appended and flushed on every call, so a crash loses nothing already logged.
    A ``log`` call writes ``{"step": 12, "time": 1790000000.5, "train/loss": 1.23, ...}``;
    a ``summary`` call writes ``{"summary": {"eval/gold_score": 0.8, ...}, "time": 1790000100.0}``.
    Non-finite floats are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` so every line is valid JSON;
    `read_metrics` and `read_summary` turn them back into floats.
``<output_dir>/samples.jsonl``
    One object per table row: ``{"step": 12, "table": "samples", "prompt": "...", "response": "...", "score": 0.4}``.
``<wandb_dir or output_dir>/wandb/``
    W&B's own files; offline runs land in ``wandb/offline-run-*/run-*.wandb`` and upload later with ``wandb sync``.
    W&B's background service may still be writing that file for a moment after `Tracker.finish` returns; it is
    complete once the process has exited.
``<tensorboard_dir or output_dir/tensorboard>/``
    TensorBoard event files: one scalar per metric, tables and the summary as markdown text.

Secrets come from the environment only and are never logged: the config goes through `redact` before it reaches W&B
or TensorBoard, and strings in tables and summaries are scrubbed of secret values found in the environment.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import netrc
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

from rlhf.checkpoint import METRICS_FILE, SAMPLES_FILE, TENSORBOARD_DIR
from rlhf.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import TrainerCallback

logger = logging.getLogger(__name__)

REPORT_TO_CHOICES = ("jsonl", "wandb", "tensorboard")
WANDB_MODES = ("online", "offline", "disabled")
MASK = "***"

_TEXT_TO_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# Names of tokenizer special tokens: `pad_token`, `eos_token`, ... are settings, not credentials.
_SPECIAL_TOKEN_ROLES = frozenset(
    {"pad", "eos", "bos", "unk", "sep", "cls", "mask", "stop", "start", "end", "eot", "eom", "special", "additional",
     "image", "audio", "video", "placeholder", "think", "tool", "fim", "prefix", "suffix", "middle", "default"}
)
_SECRET_WORDS = frozenset({"secret", "secrets", "password", "passwd", "passphrase", "apikey", "credential",
                           "credentials", "authorization"})
_SECRET_WORD_PAIRS = frozenset({("api", "key"), ("private", "key"), ("access", "key")})
_SECRET_ENV_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD")
_MIN_SECRET_LEN = 8


def _netrc_path() -> Path:
    """The netrc file ``wandb login`` writes: ``NETRC`` when set, else ``~/.netrc`` (``~/_netrc`` where only that
    one exists)."""
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    unix, windows = Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()
    return windows if windows.exists() and not unix.exists() else unix


def wandb_credentials() -> str | None:
    """Where W&B credentials were found, without reading them into anything that is logged: ``"WANDB_API_KEY"``,
    ``"WANDB_IDENTITY_TOKEN_FILE"``, or the netrc file holding a key for the W&B host (``WANDB_BASE_URL``, default
    api.wandb.ai; ``wandb login`` writes it); None when there are none. An unreadable netrc counts as none."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(name, "").strip():
            return name
    path = _netrc_path()
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "").strip() or "https://api.wandb.ai").netloc
    try:
        entry = netrc.netrc(str(path)).authenticators(host) if host and path.is_file() else None
    except (netrc.NetrcParseError, OSError) as err:
        logger.warning("W&B: %s is not a readable netrc file (%s); W&B runs stay offline", path, err)
        return None
    return str(path) if entry and entry[2] else None


def wandb_mode() -> str:
    """The W&B mode to use: ``WANDB_MODE`` when set, else ``online`` when logged in (`wandb_credentials`), else
    ``offline`` (the run is kept on disk; ``wandb sync`` uploads it later)."""
    explicit = os.environ.get("WANDB_MODE", "").strip().lower()
    if explicit:
        if explicit not in WANDB_MODES:
            raise ConfigError(
                f"environment variable WANDB_MODE={explicit!r} is not one of {', '.join(WANDB_MODES)}; "
                "set it to one of them or unset it"
            )
        return explicit
    return "online" if wandb_credentials() else "offline"


def _name_words(name: str) -> list[str]:
    """``"hfAuth_TOKEN"`` -> ``["hf", "auth", "token"]``: split on camelCase and on anything not a letter or digit."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return [word for word in re.split(r"[^a-z0-9]+", spaced.lower()) if word]


def is_secret_name(name: str) -> bool:
    """Whether a config key or variable name holds a credential.

    True for ``token``, ``hf_token``, ``auth_token``, ``access_token``, ``hubToken``, ``wandb_api_key``, ``secret``,
    ``client_secret``, ``password``; false for ``max_new_tokens``, ``pad_token``, ``eos_token``, ``tokens_per_s``,
    ``pad_token_id``, ``tokenizer``.
    """
    words = _name_words(name)
    if not words:
        return False
    if _SECRET_WORDS.intersection(words) or _SECRET_WORD_PAIRS.intersection(zip(words, words[1:])):
        return True
    last = words[-1]
    # Only a name that ends in the singular word "token" names a credential; `pad_token_id`, `tokens` do not.
    if last == "token":
        role = words[-2] if len(words) > 1 else ""
    elif last.endswith("token"):
        role = last[: -len("token")]
    else:
        return False
    return role not in _SPECIAL_TOKEN_ROLES


def _env_secret_values() -> list[str]:
    """Values of environment variables whose names say they are secrets, longest first (so they mask first)."""
    values = {
        value
        for name, value in os.environ.items()
        if len(value) >= _MIN_SECRET_LEN and any(marker in name.upper() for marker in _SECRET_ENV_MARKERS)
    }
    return sorted(values, key=len, reverse=True)


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def _masks(key: Any, value: Any) -> bool:
    # A None credential stays None: "***" would claim a secret was set.
    return isinstance(key, str) and is_secret_name(key) and value is not None


def _redact_value(value: Any, secrets: Sequence[str]) -> Any:
    if isinstance(value, str):
        return _scrub(value, secrets)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {
            key: MASK if _masks(key, item) else _redact_value(item, secrets) for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(item, secrets) for item in value)
    return value


def redact(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `config` that is safe to log.

    At any nesting level (mappings, dataclasses, lists), the value of a key named like a credential (see
    `is_secret_name`) becomes ``"***"`` unless it is None, and every occurrence of the value of an environment
    variable whose name contains KEY, TOKEN, SECRET or PASSWORD (values of 8 characters or more) inside a string
    becomes ``"***"``.
    """
    return _redact_value(dict(config), _env_secret_values())


def _argv_holds_secret() -> bool:
    """Whether the command line carries a secret: W&B records it in the run metadata."""
    secrets = _env_secret_values()
    for arg in sys.argv[1:]:
        key = arg.split("=", 1)[0].lstrip("-") if "=" in arg else ""
        if (key and is_secret_name(key.rsplit(".", 1)[-1])) or any(secret in arg for secret in secrets):
            return True
    return False


def _scalar(value: Any) -> Any:
    """Tensors and numpy scalars to Python numbers; anything else unchanged."""
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def _metric_value(key: str, value: Any) -> int | float:
    number = _scalar(value)
    if isinstance(number, bool):
        return int(number)
    if isinstance(number, (int, float)):
        return number
    raise TypeError(
        f"metric {key!r} has a value of type {type(value).__name__} ({value!r}); log numbers only "
        "(text goes to log_table or summary)"
    )


def _is_number(value: Any) -> bool:
    if isinstance(value, (bool, str, bytes)):
        return False
    try:
        return isinstance(_scalar(value), (int, float))
    except (ValueError, RuntimeError):  # a tensor or array of more than one element
        return False


def _json_safe(value: Any) -> Any:
    """A JSON-serialisable copy: non-finite floats as "nan"/"inf"/"-inf", paths and other objects as text."""
    value = _scalar(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return str(value)


def _from_json(value: Any) -> Any:
    return _TEXT_TO_NONFINITE.get(value, value) if isinstance(value, str) else value


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All records of a JSONL file; a torn last line (a crash mid-write) is skipped, any other bad line is an error."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                logger.warning("%s:%d: skipping a truncated last line (%s)", path, number, err)
                continue
            raise DataError(f"{path}:{number}: not a JSON object ({err}); the metrics file is corrupt") from err
    return records


def _metrics_file(path: str | os.PathLike[str], name: str) -> Path:
    path = Path(path)
    return path / name if path.is_dir() else path


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The ``log`` records of a metrics.jsonl (the file, or the stage directory holding it), in file order.

    Each record is ``{"step": int, "time": float, <metric>: number, ...}`` with non-finite values as floats again.
    A resumed run appends, so a step can appear more than once; the later record is the newer one.
    """
    return [
        {key: _from_json(value) for key, value in record.items()}
        for record in _read_jsonl(_metrics_file(path, METRICS_FILE))
        if "step" in record
    ]


def read_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``summary`` records of a metrics.jsonl merged in file order (later values win)."""
    merged: dict[str, Any] = {}
    for record in _read_jsonl(_metrics_file(path, METRICS_FILE)):
        if "summary" in record:
            merged.update({key: _from_json(value) for key, value in record["summary"].items()})
    return merged


def read_samples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The table rows of a samples.jsonl (the file, or the stage directory holding it), in file order."""
    return _read_jsonl(_metrics_file(path, SAMPLES_FILE))


def _markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


#: The `Tracker.locations` of every tracker this process opened with W&B or TensorBoard, in order.
_OPENED: list[dict[str, dict[str, Any]]] = []


def opened_dashboards(since: int = 0) -> list[dict[str, dict[str, Any]]]:
    """The dashboards of the trackers this process opened (one entry per stage run), oldest first, from the
    ``since``-th on: ``len(opened_dashboards())`` before a command, ``opened_dashboards(that)`` after it."""
    return _OPENED[since:]


def _shown(path: str) -> str:
    """A path as the user should type it: relative to the working directory when inside it, shell-quoted."""
    try:
        path = os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd().resolve()) else path
    except (OSError, ValueError):
        pass
    return shlex.quote(path)


def dashboard_lines(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """What to tell the user at the end of a command about the dashboards of its stage runs (`Tracker.locations`
    or the manifests' ``trackers``): the ``wandb sync`` command that uploads the offline W&B runs, the pages of the
    online ones, and the ``tensorboard`` command for the TensorBoard logs. Empty when only JSONL was written."""
    wandb_runs = [run["wandb"] for run in runs if run.get("wandb")]
    offline = [run["dir"] for run in wandb_runs if run.get("mode") == "offline" and run.get("dir")]
    online = [run for run in wandb_runs if run.get("mode") == "online" and run.get("url")]
    boards = [run["tensorboard"]["dir"] for run in runs if run.get("tensorboard", {}).get("dir")]
    groups = sorted({str(run["group"]) for run in wandb_runs if run.get("group")})
    group = f" (group {', '.join(groups)})" if groups else ""
    lines = []
    if offline:
        lines.append(f"W&B: {len(offline)} offline run{'s' * (len(offline) > 1)}{group}; upload with")
        lines.append("  wandb sync " + " ".join(_shown(path) for path in offline))
    for run in online:
        lines.append(f"W&B: {run.get('name') or run.get('id')}{group}: {run['url']}")
    if boards:
        root = os.path.commonpath([str(Path(path).resolve()) for path in boards]) if len(boards) > 1 else boards[0]
        lines.append(f"TensorBoard: tensorboard --logdir {_shown(root)}")
    return lines


class Tracker:
    """Log a stage's metrics to metrics.jsonl and, on request, to W&B and TensorBoard.

    Only the main process writes: with ``is_main_process=False`` every method does nothing and no file is created.
    Use as a context manager, or call `finish` (idempotent) at the end; a run left by an exception is marked failed
    in W&B.
    """

    def __init__(
        self,
        output_dir: Path,
        *,
        stage: str,
        report_to: Sequence[str] = ("jsonl",),
        run_name: str | None = None,
        project: str = "rlhf",
        group: str | None = None,
        entity: str | None = None,
        config: Mapping[str, Any] | None = None,
        is_main_process: bool = True,
        wandb_dir: Path | None = None,
        tensorboard_dir: Path | None = None,
        x_axis: str | None = None,
    ) -> None:
        if isinstance(report_to, str):
            report_to = [report_to]
        unknown = [name for name in report_to if name not in REPORT_TO_CHOICES]
        if unknown:
            raise ConfigError(
                f"logging.report_to: unknown value(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(REPORT_TO_CHOICES)} (jsonl is always on)"
            )
        self.output_dir = Path(output_dir)
        self.stage = stage
        self.report_to = tuple(dict.fromkeys(["jsonl", *report_to]))
        self.is_main_process = is_main_process
        self.metrics_path = self.output_dir / METRICS_FILE
        self.samples_path = self.output_dir / SAMPLES_FILE
        self.wandb_run: Any = None
        self._metrics_file: IO[str] | None = None
        self._samples_file: IO[str] | None = None
        self._tb_writer: Any = None
        #: Where the dashboards of this run are (`dashboard_lines` prints them; stages record them in the manifest).
        self.locations: dict[str, dict[str, Any]] = {}
        self._finished = not is_main_process
        if not is_main_process:
            return

        # Checked before anything is written, so a bad WANDB_MODE leaves no half-made output behind.
        mode = wandb_mode() if "wandb" in self.report_to else ""
        safe_config = redact(config or {})
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._metrics_file = self.metrics_path.open("a", encoding="utf-8")
            if "tensorboard" in self.report_to:
                self._start_tensorboard(Path(tensorboard_dir or self.output_dir / TENSORBOARD_DIR), safe_config)
            if "wandb" in self.report_to:
                try:
                    self._start_wandb(
                        Path(wandb_dir or self.output_dir), safe_config, mode=mode, run_name=run_name,
                        project=project, group=group, entity=entity, x_axis=x_axis,
                    )
                except Exception as err:  # noqa: BLE001 - as in _to_wandb: the dashboards are not worth a run
                    logger.warning("W&B: could not start this stage's run (%s: %s); it logs to metrics.jsonl%s",
                                   type(err).__name__, err, " and TensorBoard" if self._tb_writer else " only")
                    self.wandb_run = None
        except BaseException:
            self._close(exit_code=1)
            raise
        if self.locations:
            _OPENED.append(self.locations)

    def _start_tensorboard(self, log_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._tb_writer = SummaryWriter(log_dir=str(log_dir))
        self.locations["tensorboard"] = {"dir": str(log_dir)}
        if config:
            text = json.dumps(_json_safe(config), indent=2, ensure_ascii=False)
            # Four-space indent makes TensorBoard's markdown renderer show the JSON as a code block.
            self._tb_writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)

    def _start_wandb(
        self, directory: Path, config: dict[str, Any], *, mode: str, run_name: str | None, project: str,
        group: str | None, entity: str | None, x_axis: str | None,
    ) -> None:
        import wandb

        secrets = _env_secret_values()
        group = _scrub(group, secrets) if group else None
        run_name = _scrub(run_name, secrets) if run_name else None
        directory.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            # Console capture would copy whatever the process prints (secrets included) into the run; the
            # launchers' own log is the place for that text.
            console="off",
            # The run metadata records sys.argv; drop it when a secret was passed on the command line.
            x_disable_meta=_argv_holds_secret(),
        )
        self.wandb_run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            job_type=self.stage,
            name=run_name,
            config=config,
            # Absolute: a W&B service shared with another process (WANDB_SERVICE) resolves paths from its own
            # working directory.
            dir=str(directory.resolve()),
            mode=mode,
            # Several stages may run in one process (tests, notebooks): each Tracker owns its own run.
            reinit="create_new",
            settings=settings,
        )
        if x_axis:
            # The charts plot every metric against x_axis (e.g. PPO's episodes) rather than W&B's internal step.
            self.wandb_run.define_metric(x_axis)
            self.wandb_run.define_metric("*", step_metric=x_axis)
        self.locations["wandb"] = {
            "mode": mode, "project": project, "group": group, "name": run_name, "id": self.wandb_run.id,
            # An offline run's directory is what `wandb sync` uploads; an online run has its page instead.
            "dir": str(self.wandb_run.settings.sync_dir) if mode == "offline" else None,
            "url": self.wandb_run.url if mode == "online" else None,
        }
        if mode == "offline":
            logger.info("W&B is offline (no credentials; `wandb login` or WANDB_API_KEY makes runs online): this run "
                        "is kept in %s", self.locations["wandb"]["dir"])

    def _write(self, handle: IO[str], record: Mapping[str, Any]) -> None:
        handle.write(json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n")
        handle.flush()

    def _check_open(self, step: int | None = None) -> None:
        if self._finished:
            raise RuntimeError(f"the {self.stage} tracker is finished; create a new Tracker to log more")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise ValueError(f"step must be a non-negative int, got {step!r}")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record numeric metrics (Python numbers, numpy scalars or one-element tensors) at `step`."""
        if not self.is_main_process:
            return
        self._check_open(step)
        values = {str(key): _metric_value(str(key), value) for key, value in metrics.items()}
        clash = {"step", "time"}.intersection(values)
        if clash:
            raise ValueError(f"metric name(s) {sorted(clash)} are reserved in metrics.jsonl; rename them")
        assert self._metrics_file is not None
        self._write(self._metrics_file, {"step": step, "time": time.time(), **_json_safe(values)})
        if self._tb_writer is not None:
            for key, value in values.items():
                self._tb_writer.add_scalar(key, float(value), global_step=step)
        self._to_wandb("log", lambda run: run.log(values, step=step))

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (W&B on; an e-mail or Slack message where the project is set up for them); the other
        trackers have the alarm as a metric and the log line."""
        if not self.is_main_process or self.wandb_run is None:
            return
        import wandb

        self._to_wandb("alert", lambda run: run.alert(title=title, text=_scrub(text, _env_secret_values()),
                                                     level=wandb.AlertLevel.WARN))

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """Record a table (e.g. prompt, response, score samples) at `step`: one samples.jsonl line per row."""
        if not self.is_main_process:
            return
        self._check_open(step)
        columns = [str(column) for column in columns]
        clash = {"step", "table"}.intersection(columns)
        if clash:
            raise ValueError(f"table {key!r}: column name(s) {sorted(clash)} are reserved in samples.jsonl")
        secrets = _env_secret_values()
        clean_rows = []
        for index, row in enumerate(rows):
            if len(row) != len(columns):
                raise ValueError(f"table {key!r}: row {index} has {len(row)} values for {len(columns)} columns")
            clean_rows.append([_redact_value(_scalar(value), secrets) for value in row])

        if self._samples_file is None:
            self._samples_file = self.samples_path.open("a", encoding="utf-8")
        for row in clean_rows:
            self._write(self._samples_file, {"step": step, "table": key, **_json_safe(dict(zip(columns, row)))})
        if self._tb_writer is not None:
            self._tb_writer.add_text(key, _markdown_table(columns, clean_rows), global_step=step)
        if self.wandb_run is not None:
            import wandb

            self._to_wandb("log_table", lambda run: run.log({key: wandb.Table(columns=columns, data=clean_rows)},
                                                            step=step))

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """Record final figures: a ``{"summary": ...}`` line in metrics.jsonl and the W&B run summary."""
        if not self.is_main_process:
            return
        self._check_open()
        values = {str(key): _scalar(value) for key, value in redact(metrics).items()}
        assert self._metrics_file is not None
        self._write(self._metrics_file, {"summary": _json_safe(values), "time": time.time()})
        if self._tb_writer is not None:
            self._tb_writer.add_text("summary", _markdown_table(["name", "value"], list(values.items())), 0)
        self._to_wandb("summary", lambda run: run.summary.update(values))

    def _to_wandb(self, what: str, call: Any) -> None:
        """``call(run)`` on the W&B run, if there is one. A failure stops W&B logging for this run with one warning
        and never the stage: W&B's service may be gone (a signal sent to the whole job reaches it too), and the
        dashboards are not worth a run; metrics.jsonl and TensorBoard go on."""
        if self.wandb_run is None:
            return
        try:
            call(self.wandb_run)
        except Exception as err:  # noqa: BLE001 - whatever the W&B client raises, training goes on without it
            logger.warning("W&B: %s failed (%s: %s); W&B logging stops for this run, metrics.jsonl and TensorBoard "
                           "go on", what, type(err).__name__, err)
            self.wandb_run = None

    def finish(self, exit_code: int = 0) -> None:
        """Flush and close every backend; a non-zero `exit_code` marks the W&B run failed. Safe to call twice."""
        if self._finished:
            return
        self._finished = True
        self._close(exit_code)

    def _close(self, exit_code: int) -> None:
        try:
            for handle in (self._metrics_file, self._samples_file):
                if handle is not None:
                    handle.close()
            if self._tb_writer is not None:
                self._tb_writer.close()
        finally:
            self._metrics_file = self._samples_file = self._tb_writer = None
            self._to_wandb("finish", lambda run: run.finish(exit_code=exit_code))
            self.wandb_run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def trainer_metric_name(name: str, prefix: str = "train/") -> str:
    """Our name for a Trainer log key: ``loss`` -> ``train/loss``, ``eval_xxx`` -> ``eval/xxx``, else ``train/xxx``."""
    if name.startswith("eval_"):
        return "eval/" + name[len("eval_"):]
    return prefix + name


def _build_tracker_callback() -> type[TrainerCallback]:
    from transformers import TrainerCallback

    class TrackerCallback(TrainerCallback):
        """Forward a HF/TRL Trainer's logs to a `Tracker`, so trainer stages land in the same files as ours.

        Give the Trainer ``report_to=[]`` and ``callbacks=[TrackerCallback(tracker)]``. Numeric entries of each
        ``logs`` dict are logged at ``state.global_step`` under `trainer_metric_name`; only world process zero logs.
        """

        def __init__(self, tracker: Tracker, prefix: str = "train/") -> None:
            self.tracker = tracker
            self.prefix = prefix

        def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kwargs: Any):
            if not state.is_world_process_zero or not logs:
                return
            metrics = {
                trainer_metric_name(key, self.prefix): value
                for key, value in logs.items()
                if _is_number(value)
            }
            if metrics:
                self.tracker.log(metrics, step=state.global_step)

    TrackerCallback.__module__ = __name__
    return TrackerCallback


def __getattr__(name: str) -> Any:
    # TrackerCallback subclasses transformers.TrainerCallback, whose import costs seconds; build it on first use so
    # `import rlhf.tracking` stays light for stages that never touch a Trainer.
    if name == "TrackerCallback":
        cls = _build_tracker_callback()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_log_handler: logging.Handler | None = None


def setup_logging(level: str | int = "INFO", rank: int = 0, world_size: int | None = None) -> None:
    """Configure the root logger once per process: one stderr handler, one format.

    When distributed (`world_size`, default the ``WORLD_SIZE`` environment variable, above 1) the rank is part of the
    format, and ranks other than 0 log at WARNING or above so progress text appears once. Calling again replaces the
    level and format rather than adding a second handler.
    """
    global _log_handler
    if isinstance(level, str):
        name = level.strip().upper()
        if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"log level {level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        level = logging.getLevelName(name)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank_part = f"[rank {rank}] " if world_size > 1 else ""
    formatter = logging.Formatter(f"%(asctime)s {rank_part}%(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    if rank != 0:
        level = max(level, logging.WARNING)

    root = logging.getLogger()
    if _log_handler is None or _log_handler not in root.handlers:
        _log_handler = logging.StreamHandler(sys.stderr)
        root.addHandler(_log_handler)
    elif _log_handler.stream is not sys.stderr:  # stderr was replaced (redirected, or captured by a test)
        _log_handler.stream = sys.stderr  # not setStream: it flushes the old stream, which may be closed
    _log_handler.setFormatter(formatter)
    root.setLevel(level)
