"""The checkpoint-directory contract: paths, atomic writes, fingerprints, manifests and input lookup.

A stage output directory is complete when it holds a ``manifest.json`` with ``status: complete``; the manifest is
written last and atomically, so a killed run never leaves a directory that looks complete. Every path of the run
directory comes from the helpers here.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from rlhf.config import semantic_dict
from rlhf.errors import CheckpointError, storage_error

MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"  # a stage's TensorBoard logs, inside its output directory
PIPELINE_FILE = "pipeline.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_STATE = "checkpoint.json"
REPORT_DIR = "report"
REPORT_PLOT_FILE = "reward_curves.png"
REPORT_HTML_FILE = "report.html"
EVAL_RESULTS_FILE = "eval.json"
#: Written by the reward stage next to its weights: the mean and std of its scores, for normalisation downstream.
REWARD_STATS_FILE = "reward_stats.json"
MANIFEST_VERSION = 1

_TRACKED_LIBRARIES = ("rlhf", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "tokenizers")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def stage_output_dir(run_dir: str | Path, stage: str) -> Path:
    """``<run_dir>/<stage>``: where a stage writes unless its config names another directory."""
    return Path(run_dir) / stage


def output_dir_of(cfg: Any) -> Path:
    """The output directory of a stage config (``output_dir`` or ``<run_dir>/<stage>``)."""
    return Path(cfg.output_dir) if cfg.output_dir else stage_output_dir(cfg.run_dir, cfg.stage)


def manifest_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / MANIFEST


def config_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / CONFIG_FILE


def metrics_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / METRICS_FILE


def samples_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / SAMPLES_FILE


def pipeline_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / PIPELINE_FILE


def report_dir(run_dir: str | Path) -> Path:
    """``<run_dir>/report``: where ``rlhf report`` writes the run's plots and HTML page."""
    return Path(run_dir) / REPORT_DIR


def report_plot_path(run_dir: str | Path) -> Path:
    return report_dir(run_dir) / REPORT_PLOT_FILE


def report_html_path(run_dir: str | Path) -> Path:
    return report_dir(run_dir) / REPORT_HTML_FILE


def eval_results_path(run_dir: str | Path) -> Path:
    """``<run_dir>/evaluate/eval.json``: the results the evaluate stage writes into its output directory."""
    return stage_output_dir(run_dir, "evaluate") / EVAL_RESULTS_FILE


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """``<output_dir>/checkpoints/step_<N>``."""
    return checkpoints_dir(output_dir) / f"step_{step}"


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise storage_error(path, exc) from exc
    try:
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise storage_error(path, exc) from exc
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); the file is damaged") from None


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """Content hash of one file, cached per (path, size, mtime) within the process."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    cached = _HASH_CACHE.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def _hash_json(obj: Any) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def fingerprint_path(path: str | Path, *, revision: str | None = None) -> str:
    """Fingerprint of an input: a complete stage output's own fingerprint, a file's or a directory's content hash,
    or ``hub:<id>@<revision>`` for a name that is not a local path."""
    p = Path(path)
    if p.is_dir():
        manifest = read_manifest(p)
        if manifest is not None:
            return manifest["fingerprint"]
        files = sorted(f for f in p.rglob("*") if f.is_file() and not _is_scratch(f.relative_to(p)))
        return _hash_json([[f.relative_to(p).as_posix(), sha256_file(f)] for f in files])
    if p.is_file():
        return sha256_file(p)[:16]
    return f"hub:{path}@{revision or 'main'}"


def _is_scratch(rel: Path) -> bool:
    # Intermediate checkpoints and logs inside a model directory do not change what the model is.
    return rel.parts[0] in (CHECKPOINTS, "wandb", "tensorboard", ".cache") or rel.name.endswith(".tmp")


def compute_fingerprint(stage: str, semantic_config: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """hash(stage, semantic config, the inputs' fingerprints): equal exactly when the result would be the same."""
    return _hash_json({"stage": stage, "config": semantic_config, "inputs": dict(inputs)})


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def compute_platform() -> dict[str, Any]:
    """What the arithmetic ran on. Training results depend on the last bits of it: the thread count and the CPU's
    instruction set (which kernels torch, MKL and oneDNN pick) change the rounding, and PPO amplifies rounding, so
    runs with the same versions, data and seed end apart on other machines."""
    import torch

    info: dict[str, Any] = {"machine": platform.machine(), "cpu": _cpu_model(),
                            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def read_manifest(output_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete output, or None when the directory is missing or incomplete."""
    path = manifest_path(output_dir)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("status") != "complete" or "fingerprint" not in manifest:
        return None
    return manifest


def begin_output(output_dir: str | Path, *, resume: bool = False) -> Path:
    """Mark ``output_dir`` as being written: create it and remove any manifest, so that until this run writes its
    own, nothing takes the directory for a complete output (a rerun that dies half-way must not look finished).
    A fresh run also starts its logs afresh and drops the checkpoints of the run it replaces (a later resume must
    not continue that one); a resumed one appends to them."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        manifest_path(out).unlink(missing_ok=True)
    except OSError as exc:
        raise storage_error(out, exc) from exc
    if not resume:
        metrics_path(out).unlink(missing_ok=True)
        samples_path(out).unlink(missing_ok=True)
        shutil.rmtree(checkpoints_dir(out), ignore_errors=True)
        shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
    _fsync_dir(out)
    return out


def write_manifest(
    output_dir: str | Path,
    *,
    stage: str,
    fingerprint: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, Mapping[str, str]],
    seed: int,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` atomically; call it last, once everything else in the directory is written."""
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "stage": stage,
        "status": "complete",
        "fingerprint": fingerprint,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seed": seed,
        "config": dict(config),
        "inputs": {k: dict(v) for k, v in inputs.items()},
        "versions": library_versions(),
        "platform": compute_platform(),
        "metrics": dict(metrics or {}),
    }
    if extra:
        manifest.update(extra)
    write_json_atomic(manifest_path(output_dir), manifest)
    return manifest


def require_complete(output_dir: str | Path, *, stage: str, how_to_build: str) -> dict[str, Any]:
    """The manifest of a complete stage output, or an error that says which stage to (re)run and how."""
    out = Path(output_dir)
    if not out.exists():
        raise CheckpointError(f"{out} does not exist: the {stage} stage has not been run. Run it first: {how_to_build}")
    manifest = read_manifest(out)
    if manifest is None:
        raise CheckpointError(
            f"{out} is incomplete (no complete {MANIFEST}): the {stage} stage did not finish. "
            f"Rerun it: {how_to_build}"
        )
    if manifest.get("stage") != stage:
        raise CheckpointError(
            f"{out} holds the output of the {manifest.get('stage')!r} stage, not {stage!r}; point the config at "
            f"a {stage} output directory"
        )
    return manifest


def require_upstream(output_dir: str | Path, *, stage: str, run_dir: str | Path) -> dict[str, Any]:
    """`require_complete` for a stage's default input, this run's ``stage`` output: the error names the launcher
    that builds it."""
    return require_complete(output_dir, stage=stage, how_to_build=f"accelerate launch launch/{stage}.py "
                                                                   f"run_dir={run_dir}")


def ensure_run_dir(run_dir: str | Path, *, pipeline: str) -> dict[str, Any]:
    """Create ``<run_dir>/pipeline.json`` identifying the run, or check that an existing one is the same pipeline."""
    path = pipeline_path(run_dir)
    if path.is_file():
        info = read_json(path)
        if info.get("pipeline") != pipeline:
            raise CheckpointError(
                f"{run_dir} belongs to pipeline {info.get('pipeline')!r} (see {path}), not {pipeline!r}; "
                f"choose another run_dir, or delete {run_dir} if its outputs are no longer needed"
            )
        return info
    info = {
        "run_id": uuid.uuid4().hex,
        "pipeline": pipeline,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rlhf_version": library_versions().get("rlhf", "unknown"),
    }
    write_json_atomic(path, info)
    return info


def list_checkpoints(output_dir: str | Path) -> list[int]:
    """Steps of the complete intermediate checkpoints (those whose ``checkpoint.json`` was written), ascending."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / CHECKPOINT_STATE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    steps = list_checkpoints(output_dir)
    return checkpoint_dir(output_dir, steps[-1]) if steps else None


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> list[int]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and any incomplete ones older than the newest
    complete one. Returns the removed steps."""
    steps = list_checkpoints(output_dir)
    removed = steps[:-keep_last] if keep_last > 0 else steps
    newest = steps[-1] if steps else None
    root = checkpoints_dir(output_dir)
    for step in removed:
        shutil.rmtree(checkpoint_dir(output_dir, step), ignore_errors=True)
    if root.is_dir() and newest is not None:
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and int(match.group(1)) < newest and not (child / CHECKPOINT_STATE).is_file():
                shutil.rmtree(child, ignore_errors=True)
    return removed


def input_record(path: str | Path, *, revision: str | None = None) -> dict[str, str]:
    """``{"path", "fingerprint"}`` of one input, as stored in a manifest."""
    return {"path": str(path), "fingerprint": fingerprint_path(path, revision=revision)}


def input_fingerprints(records: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    return {name: rec["fingerprint"] for name, rec in records.items()}


def stage_fingerprint(cfg: Any) -> tuple[str, dict[str, dict[str, str]]]:
    """The fingerprint a stage config produces with its current inputs, and the input records for the manifest."""
    revision = getattr(getattr(cfg, "model", None), "revision", None)
    records = {name: input_record(path, revision=revision) for name, path in cfg.input_paths().items() if path}
    return compute_fingerprint(cfg.stage, semantic_dict(cfg), input_fingerprints(records)), records


def truncate_logs_to(checkpoint: str | Path) -> int:
    """`truncate_logs` of the stage output that holds ``checkpoint`` (``<output>/checkpoints/step_N``), after the
    step the checkpoint recorded: what a run resumed from it will log again. Returns the number of rows dropped."""
    checkpoint = Path(checkpoint)
    return truncate_logs(checkpoint.parent.parent, after_step=read_json(checkpoint / CHECKPOINT_STATE)["step"])


def truncate_logs(output_dir: str | Path, *, after_step: int) -> int:
    """Drop the metrics and sample rows a resumed run will write again (``step > after_step``) and any summary
    line, so its logs read as if it had never stopped. Returns the number of rows dropped."""
    import json

    dropped = 0
    for path in (metrics_path(output_dir), samples_path(output_dir)):
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1  # a line cut short by the stop
                continue
            if "summary" in row or row.get("step", 0) > after_step:
                dropped += 1
                continue
            kept.append(line)
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped
