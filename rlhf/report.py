"""A run's report: its training curves as one PNG and a self-contained HTML page.

``rlhf report <run_dir>`` reads what the stages left under ``<run_dir>/<stage>/`` (``metrics.jsonl``,
``manifest.json``, ``config.yaml``, ``samples.jsonl``) and writes

``<run_dir>/report/reward_curves.png``
    PPO reward-model score, KL to the reference, the KL-penalised reward, response length and EOS rate, the losses
    and the held-out evaluations over episodes; SFT and reward-model training over optimiser steps. A panel whose
    stage or metric is missing says "no data".
``<run_dir>/report/report.html``
    One page without external assets: the PNG inline, each stage's status, fingerprint and final metrics, PPO's
    held-out before/after table, the evaluate stage's ``eval.json`` when present, sample responses and the resolved
    configs.

The report only reads the run, so it works on finished, partial and still-running runs alike.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np

from rlhf.checkpoint import (
    METRICS_FILE,
    config_path,
    eval_results_path,
    metrics_path,
    read_json,
    read_manifest,
    report_html_path,
    report_plot_path,
    samples_path,
    stage_output_dir,
    write_bytes_atomic,
    write_text_atomic,
)
from rlhf.errors import CheckpointError
from rlhf.tracking import read_metrics, read_samples

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: The stages a report covers, in pipeline order.
REPORT_STAGES = ("sft", "reward", "ppo")
#: Stages the report covers when the run directory has their output (then with two panels more).
OPTIONAL_REPORT_STAGES = ("dpo",)
#: Final metrics shown for each stage in the stage table (all of them are under "all final metrics").
KEY_METRICS = {
    "sft": ("train/loss", "eval/loss", "eval/perplexity", "train/steps"),
    "reward": ("train/loss", "eval/accuracy", "eval/margin", "train/steps"),
    "ppo": ("updates", "rollout/score_mean", "rollout/kl", "ppo/kl_coef", "perf/tokens_per_s", "perf/utilisation"),
    "dpo": ("train/loss", "eval/accuracy", "eval/margin", "eval/logratio_chosen", "eval/logp_chosen"),
}
#: Held-out metrics listed first in the before/after table; the others follow in the manifest's order.
BEFORE_AFTER_FIRST = ("score_mean", "kl", "gold_combined", "gold_positive", "response_len", "eos_rate")
#: samples.jsonl tables to show, in order of preference: held-out responses first.
SAMPLE_TABLES = ("eval_samples", "rollout_samples")
MAX_SAMPLES = 10
# Fewer points than this are drawn as they are: a moving average over a handful of points hides more than it shows.
SMOOTH_MIN_POINTS = 15
DPI = 150

Status = Literal["complete", "incomplete", "missing"]

# One colour per quantity, the same in every panel it appears in.
COLORS = {
    "score": "#1f77b4",
    "kl": "#d62728",
    "rlhf_reward": "#6a3d9a",
    "length": "#17becf",
    "eos": "#ff7f0e",
    "value_loss": "#8c564b",
    "policy_loss": "#e377c2",
    "gold_combined": "#2ca02c",
    "gold_positive": "#98c13d",
    "train_loss": "#3b5b92",
    "eval_loss": "#e6550d",
    "accuracy": "#2ca02c",
    "alarm": "#b2182b",
}


@dataclass
class StageRecord:
    """What one stage left in the run directory."""

    name: str
    output_dir: Path
    status: Status
    manifest: dict[str, Any] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    config_text: str | None = None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, ascending; a step logged twice keeps its later value."""
        by_step: dict[int, float] = {}
        for record in self.records:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                by_step[record["step"]] = float(value)
        steps = sorted(by_step)
        return steps, [by_step[step] for step in steps]

    @property
    def last_step(self) -> int | None:
        return max((record["step"] for record in self.records), default=None)


def load_stage(run_dir: Path, stage: str) -> StageRecord:
    out = stage_output_dir(run_dir, stage)
    if not out.is_dir():
        return StageRecord(stage, out, "missing")
    manifest = read_manifest(out)
    return StageRecord(
        name=stage,
        output_dir=out,
        status="complete" if manifest is not None else "incomplete",
        manifest=manifest,
        records=read_metrics(metrics_path(out)) if metrics_path(out).is_file() else [],
        samples=read_samples(samples_path(out)) if samples_path(out).is_file() else [],
        config_text=config_path(out).read_text(encoding="utf-8") if config_path(out).is_file() else None,
    )


def load_run(run_dir: str | Path) -> dict[str, StageRecord]:
    """Every report stage of `run_dir`; an error naming the directory when it holds none of them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is not a directory" if run_dir.exists() else "does not exist"
        raise CheckpointError(
            f"{run_dir} {what}: nothing to report; pass the run_dir the stages wrote to (e.g. runs/demo)"
        )
    stages = {stage: load_stage(run_dir, stage) for stage in REPORT_STAGES}
    for stage in OPTIONAL_REPORT_STAGES:
        if (record := load_stage(run_dir, stage)).status != "missing":
            stages[stage] = record
    if all(record.status == "missing" for record in stages.values()):
        raise CheckpointError(
            f"{run_dir} holds none of the stage outputs {', '.join(s + '/' for s in REPORT_STAGES)}: it is not a run "
            "directory; pass the run_dir the stages wrote to (each stage writes <run_dir>/<stage>/)"
        )
    return stages


def rollout_batch_size(ppo: StageRecord) -> int | None:
    """Prompts per PPO update, from the manifest's resolved config, else from config.yaml of a run still going."""
    config = ppo.manifest.get("config") if ppo.manifest else None
    if config is None and ppo.config_text is not None:
        import yaml

        try:
            config = yaml.safe_load(ppo.config_text)
        except yaml.YAMLError:
            config = None
    rollout = config.get("rollout") if isinstance(config, dict) else None
    size = rollout.get("batch_size") if isinstance(rollout, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Centred moving average of `window` points, over fewer at the ends; NaNs are left out of each mean."""
    v = np.asarray(values, dtype=float)
    finite = np.isfinite(v)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, v, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    index = np.arange(len(v))
    lo = np.maximum(0, index - window // 2)
    hi = np.minimum(len(v), index + window // 2 + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums[hi] - sums[lo]) / (counts[hi] - counts[lo])


def smoothing_window(num_points: int) -> int:
    """About a tenth of the curve, odd, between 3 and 51 points; 1 (no smoothing) for short curves."""
    if num_points < SMOOTH_MIN_POINTS:
        return 1
    return min(51, max(3, num_points // 10) | 1)


def _curve(ax: Axes, x: Sequence[float], y: Sequence[float], color: str, label: str) -> list[Any]:
    """A noisy per-step curve: the raw values light, their moving average on top; returns the legend handle."""
    window = smoothing_window(len(y))
    if window == 1:
        return ax.plot(x, y, color=color, lw=1.8, marker="." if len(y) < SMOOTH_MIN_POINTS else None, label=label)
    ax.plot(x, y, color=color, lw=1.0, alpha=0.3)
    return ax.plot(x, moving_average(y, window), color=color, lw=2.0, label=f"{label} (avg of {window})")


def _points(ax: Axes, x: Sequence[float], y: Sequence[float], color: str, label: str) -> list[Any]:
    """A metric logged at a few steps only: markers joined by lines."""
    return ax.plot(x, y, color=color, lw=1.5, marker="o", ms=6, label=label)


def _no_data(ax: Axes, why: str) -> None:
    ax.text(0.5, 0.5, f"no data\n{why}", ha="center", va="center", transform=ax.transAxes, color="0.45", fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("0.8")


def _legend(ax: Axes, handles: list[Any]) -> None:
    # Below the panel: inside it, a legend hides part of a curve on one of the two y axes whatever the placement.
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(len(handles), 4),
                  fontsize=8.5, frameon=False, handlelength=2.2)


def _twin(ax: Axes, color: str, label: str) -> Axes:
    other = ax.twinx()
    other.set_ylabel(label, color=color)
    other.tick_params(axis="y", colors=color)
    other.spines["right"].set_color(color)
    return other


def _missing(stage: StageRecord, *keys: str) -> str | None:
    """Why a panel of `keys` cannot be drawn, or None when the first key has data."""
    if stage.status == "missing":
        return f"{stage.name}/ is missing"
    if not stage.records:
        return f"{stage.name}/{METRICS_FILE} has no records"
    if not stage.series(keys[0])[0]:
        return f"no {keys[0]} in {stage.name}/{METRICS_FILE}"
    return None


def render_curves(run_name: str, stages: dict[str, StageRecord]) -> bytes:
    """The PNG of `curves_figure`."""
    buffer = io.BytesIO()
    curves_figure(run_name, stages).savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


@dataclass
class _PPOAxis:
    """PPO's x axis: update steps scaled to episodes (responses) when the batch size is known."""

    record: StageRecord
    scale: int
    label: str

    def series(self, key: str) -> tuple[list[float], list[float]]:
        steps, values = self.record.series(key)
        return [step * self.scale for step in steps], values


def curves_figure(run_name: str, stages: dict[str, StageRecord]) -> Figure:
    """The run's curves in eight panels (a) to (h): PPO over episodes, SFT and reward model over optimiser steps;
    with a DPO output, (i) and (j) for DPO over its optimiser steps."""
    # The Figure API draws without pyplot and its global backend state, so a headless server or an open notebook
    # both work and nothing leaks between calls.
    from matplotlib.figure import Figure

    ppo = stages["ppo"]
    batch = rollout_batch_size(ppo)
    x = _PPOAxis(ppo, batch or 1, f"episodes (updates \u00d7 {batch} responses)" if batch else "PPO update")
    dpo = stages.get("dpo")
    fig = Figure(figsize=(14, 22.5 if dpo else 18), layout="constrained")
    statuses = ", ".join(f"{name} {record.status}" for name, record in stages.items())
    fig.suptitle(f"RLHF run '{run_name}'   ({statuses})", fontsize=15, fontweight="bold")
    fig.supxlabel("Light lines: raw values per step; bold lines: centred moving average.  "
                  "Markers: held-out evaluations.", fontsize=9, color="0.35")
    panels = fig.subplots(5 if dpo else 4, 2).flatten()
    titles = (
        "(a) PPO: reward-model score of rollouts", "(b) PPO: KL(policy || reference)",
        "(c) PPO: RLHF reward = score \u2212 \u03b2\u00b7KL", "(d) PPO: response length and EOS rate",
        "(e) PPO: value loss and policy loss", "(f) PPO: held-out evaluation",
        "(g) SFT: train and eval loss", "(h) Reward model: train loss and accuracy",
        "(i) DPO: loss and the chosen responses' log-ratio", "(j) DPO: implicit reward margin and accuracy",
    )
    for ax, title in zip(panels, titles):
        ax.set_title(title)
        ax.grid(True, color="0.9", lw=0.8)
        ax.set_axisbelow(True)
    _score_and_kl_panels(panels[0], panels[1], x)
    _objective_panel(panels[2], x)
    _length_panel(panels[3], x)
    _loss_panel(panels[4], x)
    _eval_panel(panels[5], x)
    _alarm_markers(panels[:6], x)
    _sft_panel(panels[6], stages["sft"])
    _reward_panel(panels[7], stages["reward"])
    if dpo:
        _dpo_loss_panel(panels[8], dpo)
        _dpo_margin_panel(panels[9], dpo)
    return fig


def alarm_steps(ppo: StageRecord) -> dict[str, int]:
    """Each reward-hacking alarm that fired in the PPO run (``alarm/fired/<name>`` metrics) and its update."""
    fired: dict[str, int] = {}
    for record in ppo.records:
        for key in record:
            if key.startswith("alarm/fired/") and "step" in record:
                fired.setdefault(key[len("alarm/fired/"):], int(record["step"]))
    return fired


def _alarm_markers(axes: Sequence[Axes], x: _PPOAxis) -> None:
    """A dashed vertical line, labelled with the alarm's name, on each PPO panel at the update an alarm fired."""
    for name, step in alarm_steps(x.record).items():
        for ax in axes:
            if ax.has_data():
                ax.axvline(step * x.scale, color=COLORS["alarm"], lw=1.0, ls="--", label=f"alarm: {name}")
                ax.annotate(f"alarm: {name}", xy=(step * x.scale, 1.0), xycoords=("data", "axes fraction"),
                            rotation=90, va="top", ha="right", fontsize=7, color=COLORS["alarm"])


def _score_and_kl_panels(score_ax: Axes, kl_ax: Axes, x: _PPOAxis) -> None:
    """(a) reward-model score of the rollouts, (b) KL to the reference policy."""
    for ax, key, color, ylabel in ((score_ax, "rollout/score_mean", COLORS["score"], "RM score (mean over batch)"),
                                   (kl_ax, "rollout/kl", COLORS["kl"], "KL per response (nats)")):
        if why := _missing(x.record, key):
            _no_data(ax, why)
            continue
        _legend(ax, _curve(ax, *x.series(key), color, key))
        ax.set_xlabel(x.label)
        ax.set_ylabel(ylabel)


def _objective_panel(ax: Axes, x: _PPOAxis) -> None:
    """(c) the objective PPO maximises: score - beta * KL (Ziegler et al. 2019, eq. 2), beta as logged per update."""
    ppo = x.record
    if why := (_missing(ppo, "rollout/score_mean") or _missing(ppo, "rollout/kl") or _missing(ppo, "ppo/kl_coef")):
        _no_data(ax, why)
        return
    score, kl, beta = (dict(zip(*ppo.series(key))) for key in ("rollout/score_mean", "rollout/kl", "ppo/kl_coef"))
    steps = sorted(set(score) & set(kl) & set(beta))
    objective = [score[step] - beta[step] * kl[step] for step in steps]
    betas = {beta[step] for step in steps}
    beta_text = f"\u03b2 = {betas.pop():.3g}" if len(betas) == 1 else "adaptive \u03b2"
    label = f"score \u2212 \u03b2\u00b7KL, {beta_text}"
    handles = _curve(ax, [step * x.scale for step in steps], objective, COLORS["rlhf_reward"], label)
    ax.axhline(0.0, color="0.6", lw=0.8)
    _legend(ax, handles)
    ax.set_xlabel(x.label)
    ax.set_ylabel("reward")


def _length_panel(ax: Axes, x: _PPOAxis) -> None:
    """(d) response length and how often the policy stops on its own."""
    if why := _missing(x.record, "rollout/response_len"):
        _no_data(ax, why)
        return
    handles = _curve(ax, *x.series("rollout/response_len"), COLORS["length"], "rollout/response_len")
    ax.set_ylabel("tokens per response", color=COLORS["length"])
    ax.tick_params(axis="y", colors=COLORS["length"])
    if x.record.series("rollout/eos_rate")[0]:
        right = _twin(ax, COLORS["eos"], "EOS rate")
        handles += _curve(right, *x.series("rollout/eos_rate"), COLORS["eos"], "rollout/eos_rate")
        right.set_ylim(top=1.02)
    _legend(ax, handles)
    ax.set_xlabel(x.label)


def _loss_panel(ax: Axes, x: _PPOAxis) -> None:
    """(e) the two PPO losses, on their own scales; the policy loss alone without a critic."""
    ppo = x.record
    if why := (_missing(ppo, "ppo/value_loss") and _missing(ppo, "ppo/policy_loss")):
        _no_data(ax, why)
        return
    handles = []
    if ppo.series("ppo/value_loss")[0]:
        handles += _curve(ax, *x.series("ppo/value_loss"), COLORS["value_loss"], "ppo/value_loss")
        ax.set_ylabel("value loss", color=COLORS["value_loss"])
        ax.tick_params(axis="y", colors=COLORS["value_loss"])
    else:  # a critic-free estimator: no critic, no value loss
        ax.set_title("(e) PPO: policy loss (no critic)")
        ax.set_yticks([])
    if ppo.series("ppo/policy_loss")[0]:
        right = _twin(ax, COLORS["policy_loss"], "policy loss")
        handles += _curve(right, *x.series("ppo/policy_loss"), COLORS["policy_loss"], "ppo/policy_loss")
        right.axhline(0.0, color=COLORS["policy_loss"], lw=0.6, ls=":")
    _legend(ax, handles)
    ax.set_xlabel(x.label)


def _eval_panel(ax: Axes, x: _PPOAxis) -> None:
    """(f) held-out evaluations, logged at a few updates only: the reward-model score and the gold judge's."""
    if why := _missing(x.record, "eval/score_mean"):
        _no_data(ax, why)
        return
    handles = _points(ax, *x.series("eval/score_mean"), COLORS["score"], "eval/score_mean")
    ax.set_ylabel("RM score", color=COLORS["score"])
    ax.tick_params(axis="y", colors=COLORS["score"])
    golds = [key for key in ("eval/gold_combined", "eval/gold_positive") if x.record.series(key)[0]]
    if golds:
        right = _twin(ax, COLORS["gold_combined"], "gold judge (0 to 1)")
        for key in golds:
            handles += _points(right, *x.series(key), COLORS[key.split("/")[1]], key)
            handles[-1].set_linestyle("--")
        right.set_ylim(0.0, 1.02)
    _legend(ax, handles)
    ax.set_xlabel(x.label)


def _sft_panel(ax: Axes, sft: StageRecord) -> None:
    """(g) SFT losses."""
    if why := (_missing(sft, "train/loss") and _missing(sft, "eval/loss")):
        _no_data(ax, why)
        return
    handles = []
    if sft.series("train/loss")[0]:
        handles += _curve(ax, *sft.series("train/loss"), COLORS["train_loss"], "train/loss")
    if sft.series("eval/loss")[0]:
        handles += _points(ax, *sft.series("eval/loss"), COLORS["eval_loss"], "eval/loss")
    _legend(ax, handles)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy loss")


def _reward_panel(ax: Axes, reward: StageRecord) -> None:
    """(h) reward model: loss and pairwise accuracy."""
    if why := (_missing(reward, "train/loss") and _missing(reward, "eval/accuracy")):
        _no_data(ax, why)
        return
    handles = []
    if reward.series("train/loss")[0]:
        handles += _curve(ax, *reward.series("train/loss"), COLORS["train_loss"], "train/loss")
    if reward.series("eval/loss")[0]:
        handles += _points(ax, *reward.series("eval/loss"), COLORS["eval_loss"], "eval/loss")
    ax.set_ylabel("pairwise loss")
    handles += _pair_accuracy(ax, reward, ("train/accuracy", "eval/accuracy"), fade_train=True)
    _legend(ax, handles)
    ax.set_xlabel("optimiser step")


def _pair_accuracy(ax: Axes, record: StageRecord, keys: Sequence[str], *, fade_train: bool = False) -> list[Any]:
    """The share of pairs ordered right (``keys``: a train curve, held-out points) on a twin axis with the chance
    line; ``fade_train`` draws the train curve's last line faded and dashed. Returns the legend handles."""
    handles: list[Any] = []
    accuracies = [key for key in keys if record.series(key)[0]]
    if accuracies:
        right = _twin(ax, COLORS["accuracy"], "accuracy (chosen > rejected)")
        for key in accuracies:
            draw = _points if key.startswith("eval/") else _curve
            handles += draw(right, *record.series(key), COLORS["accuracy"], key)
            if fade_train and key.startswith("train/"):
                handles[-1].set_alpha(0.55)
                handles[-1].set_linestyle("--")
        right.axhline(0.5, color=COLORS["accuracy"], lw=0.6, ls=":")
    return handles


def _dpo_loss_panel(ax: Axes, dpo: StageRecord) -> None:
    """(i) DPO's loss (train, held-out) and, on its own axis, the chosen responses' mean log-ratio to the reference
    (the implicit reward over beta): how far the policy has moved on the data, in nats. A reference-free loss (simpo)
    has no log-ratio: that axis shows the chosen responses' mean token log-prob instead."""
    if why := _missing(dpo, "train/loss"):
        _no_data(ax, why)
        return
    handles = _curve(ax, *dpo.series("train/loss"), COLORS["train_loss"], "train/loss")
    if dpo.series("eval/loss")[0]:
        handles += _points(ax, *dpo.series("eval/loss"), COLORS["eval_loss"], "eval/loss")
    ax.set_ylabel("preference loss")
    beta = ((dpo.manifest or {}).get("config") or {}).get("beta") or (dpo.manifest or {}).get("beta")
    steps, chosen = dpo.series("train/rewards/chosen")
    if _dpo_loss_type(dpo) == "simpo":
        ax.set_title("(i) DPO (SimPO, no reference): loss and the chosen responses' log-prob")
        steps, logps = dpo.series("train/logps/chosen")
        if steps:
            right = _twin(ax, COLORS["kl"], "mean log \u03c0 per token, chosen (nats)")
            handles += _curve(right, steps, logps, COLORS["kl"], "log-prob, chosen")
    elif beta and steps:
        right = _twin(ax, COLORS["kl"], "log \u03c0/\u03c0_ref of chosen (nats)")
        handles += _curve(right, steps, [value / beta for value in chosen], COLORS["kl"], "log-ratio, chosen")
    _legend(ax, handles)
    ax.set_xlabel("optimiser step")


def _dpo_loss_type(dpo: StageRecord) -> str | None:
    """The DPO stage's loss_type: from its manifest, else from config.yaml of a run still going."""
    if dpo.manifest:
        return dpo.manifest.get("loss_type") or (dpo.manifest.get("config") or {}).get("loss_type")
    if dpo.config_text is None:
        return None
    import yaml

    try:
        config = yaml.safe_load(dpo.config_text)
    except yaml.YAMLError:
        return None
    return config.get("loss_type") if isinstance(config, dict) else None


def _dpo_margin_panel(ax: Axes, dpo: StageRecord) -> None:
    """(j) DPO's implicit reward margin (chosen - rejected) and the share of pairs it orders right."""
    if why := (_missing(dpo, "train/rewards/margins") and _missing(dpo, "eval/rewards/margins")):
        _no_data(ax, why)
        return
    handles = []
    if dpo.series("train/rewards/margins")[0]:
        handles += _curve(ax, *dpo.series("train/rewards/margins"), COLORS["score"], "train/rewards/margins")
    if dpo.series("eval/rewards/margins")[0]:
        handles += _points(ax, *dpo.series("eval/rewards/margins"), COLORS["score"], "eval/rewards/margins")
    ax.set_ylabel("implicit reward margin")
    handles += _pair_accuracy(ax, dpo, ("train/rewards/accuracies", "eval/rewards/accuracies"))
    _legend(ax, handles)
    ax.set_xlabel("optimiser step")


def _fmt(value: Any) -> str:
    """A cell's text, HTML-escaped: floats to 4 significant digits, anything else as it is."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return html.escape(json.dumps(value, ensure_ascii=False))
    return html.escape(str(value))


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, raw: bool = False, cls: str = "") -> str:
    """An HTML table; cells are formatted and escaped with `_fmt` unless `raw` (already HTML)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell if raw else _fmt(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _stage_table(stages: dict[str, StageRecord]) -> str:
    rows = []
    for name, stage in stages.items():
        manifest = stage.manifest or {}
        metrics = manifest.get("metrics", {})
        if stage.status == "complete":
            shown = [key for key in KEY_METRICS.get(name, ()) if key in metrics] or list(metrics)[:4]
            summary = "<br>".join(f"<code>{html.escape(key)}</code> {_fmt(metrics[key])}" for key in shown)
        elif stage.status == "incomplete":
            last = stage.last_step
            summary = "no complete manifest" + (f"; last logged step {last}" if last is not None else "")
        else:
            summary = ""
        rows.append([
            f"<b>{html.escape(name)}</b>",
            f'<span class="status {stage.status}">{stage.status}</span>',
            f"<code>{_fmt(manifest.get('fingerprint', ''))}</code>",
            _fmt(manifest.get("created_at", "")),
            summary,
        ])
    return _table(["stage", "status", "fingerprint", "created", "key final metrics"], rows, raw=True)


def _reward_model_report(reward: StageRecord) -> str:
    """The reward stage's report on its held-out pairs (`rlhf.reward_report`): accuracy by length bucket, the
    correlation of score with length, the reliability table of its Bradley-Terry probability, gold agreement."""
    manifest = reward.manifest or {}
    report, gate = manifest.get("report") or {}, manifest.get("gate") or {}
    if not report:
        return ""
    summary = [["held-out pairs", report["num_pairs"]], ["accuracy", report["accuracy"]],
               ["gate (reward.min_eval_accuracy)",
                {True: "passed", False: "failed", None: "not measured"}[gate.get("passed")] +
                (f" ({gate['min_eval_accuracy']:g})" if "min_eval_accuracy" in gate else "")],
               ["correlation of score with response length", report.get("length_correlation")],
               ["expected calibration error", report.get("expected_calibration_error")]]
    if "gold_agreement" in report:
        summary.append([f"agreement with the gold judge ({report['gold_pairs']} pairs it does not tie)",
                        report["gold_agreement"]])
    rows = [[f"{b['min_length']:g}\u2013{b['max_length']:g}", b["pairs"], b["accuracy"]] for b in report["by_length"]]
    bins = [[f"{c['confidence'][0]:g}\u2013{c['confidence'][1]:g}", c["pairs"], c["mean_confidence"], c["accuracy"]]
            for c in report["calibration"]]
    return ("<h2>Reward model on its held-out pairs</h2>" + _table(["measure", "value"], summary, cls="numbers")
            + "<h3>Accuracy by response length (tokens, the pair's mean)</h3>"
            + _table(["length", "pairs", "accuracy"], rows, cls="numbers")
            + "<h3>Calibration: the Bradley\u2013Terry probability of its choice against how often it is right</h3>"
            + _table(["confidence", "pairs", "mean confidence", "accuracy"], bins, cls="numbers"))


def _before_after(ppo: StageRecord) -> str:
    """PPO's held-out metrics before training (``initial/*``) and after it (``final/*``)."""
    metrics = (ppo.manifest or {}).get("metrics", {})
    names = list(dict.fromkeys(key.split("/", 1)[1] for key in metrics if key.startswith(("initial/", "final/"))))
    rank = {name: index for index, name in enumerate(BEFORE_AFTER_FIRST)}
    names.sort(key=lambda name: rank.get(name, len(rank)))
    rows = []
    for name in names:
        before, after = metrics.get(f"initial/{name}"), metrics.get(f"final/{name}")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (before, after))
        rows.append([name, "" if before is None else before, "" if after is None else after,
                     f"{after - before:+.4g}" if numbers else ""])
    if not rows:
        return ""
    return "<h2>PPO held-out evaluation: before \u2192 after</h2>" + _table(
        ["metric", "before (initial)", "after (final)", "change"], rows, cls="numbers"
    )


def _json_tables(data: Any) -> str:
    """A dict's numbers as a name/value table; its dicts that share their keys (one per policy, say) as one matrix,
    a row each; a dict of its own as a table of its own; anything deeper as JSON text in its cell."""
    if not isinstance(data, dict):
        return f"<pre>{html.escape(json.dumps(data, indent=2, ensure_ascii=False))}</pre>"
    flat = [[key, value] for key, value in data.items() if not isinstance(value, dict)]
    groups: dict[tuple[str, ...], dict[str, dict[str, Any]]] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            groups.setdefault(tuple(value), {})[key] = value
    parts = [_table(["name", "value"], flat, cls="numbers")] if flat else []
    for columns, rows in groups.items():
        if len(rows) == 1:
            (name, value), = rows.items()
            parts.append(_table([name, ""], list(value.items()), cls="numbers"))
        else:
            parts.append(_table(["", *columns], [[name, *value.values()] for name, value in rows.items()],
                                cls="numbers"))
    return "".join(parts)


def _samples(ppo: StageRecord) -> str:
    """Up to `MAX_SAMPLES` rows of the preferred samples table at its last step."""
    for table in SAMPLE_TABLES:
        rows = [row for row in ppo.samples if row.get("table") == table]
        if rows:
            break
    else:
        return ""
    step = max(row["step"] for row in rows)
    rows = [row for row in rows if row["step"] == step][:MAX_SAMPLES]
    keys = list(dict.fromkeys(key for row in rows for key in row if key not in ("step", "table")))
    columns = [key for key in ("prompt", "response") if key in keys] + [
        key for key in keys if key not in ("prompt", "response")
    ]
    where = f"update {step}" + (f", episode {step * rollout_batch_size(ppo)}" if rollout_batch_size(ppo) else "")
    return (
        f"<h2>Sample responses</h2><p class=\"note\">table <code>{html.escape(table)}</code> at {where} "
        f"({len(rows)} shown)</p>"
        + _table(columns, [[row.get(column, "") for column in columns] for row in rows], cls="samples")
    )


def _configs(stages: dict[str, StageRecord]) -> str:
    parts = []
    for name, stage in stages.items():
        if stage.config_text is not None:
            parts.append(
                f"<details><summary>{html.escape(name)}: resolved config "
                f"(<code>{html.escape(str(config_path(stage.output_dir)))}</code>)</summary>"
                f"<pre>{html.escape(stage.config_text)}</pre></details>"
            )
        metrics = (stage.manifest or {}).get("metrics")
        if metrics:
            parts.append(
                f"<details><summary>{html.escape(name)}: all final metrics</summary>"
                + _table(["metric", "value"], sorted(metrics.items()), cls="numbers")
                + "</details>"
            )
    return "<h2>Configs and metrics</h2>" + "".join(parts) if parts else ""


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222; max-width: 1200px;
       margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.note { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #f4f6f8; }
tbody tr:nth-child(even) { background: #fafbfc; }
table.numbers td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
table.samples td { white-space: pre-wrap; max-width: 32em; }
code, pre { font-family: Menlo, Consolas, monospace; font-size: 0.9em; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; border-radius: 4px; }
details { margin: 0.4em 0; } summary { cursor: pointer; }
.status { padding: 0.1em 0.5em; border-radius: 3px; font-weight: 600; }
.status.complete { background: #e3f4e1; color: #1e6b1e; }
.status.incomplete { background: #fff3d6; color: #8a5a00; }
.status.missing { background: #f1f1f1; color: #777; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def render_html(run_dir: Path, run_name: str, stages: dict[str, StageRecord], png: bytes) -> str:
    title = f"RLHF report: {run_name}"
    parts = [
        f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class=\"note\"><code>{html.escape(str(run_dir))}</code> &middot; generated "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}</p>",
        "<h2>Stages</h2>",
        _stage_table(stages),
        _reward_model_report(stages["reward"]),
        _before_after(stages["ppo"]),
    ]
    eval_path = eval_results_path(run_dir)
    if eval_path.is_file():
        parts.append(f"<h2>Evaluation</h2><p class=\"note\"><code>{html.escape(str(eval_path))}</code></p>")
        parts.append(_json_tables(read_json(eval_path)))
    parts += [
        "<h2>Training curves</h2>",
        f'<img alt="training curves of {html.escape(run_name)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">',
        _samples(stages["ppo"]),
        _configs(stages),
        "</body></html>\n",
    ]
    return "\n".join(part for part in parts if part)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``<run_dir>/report/reward_curves.png`` and ``report.html`` atomically; returns (png path, html path).

    Raises CheckpointError when `run_dir` does not exist or holds none of the sft, reward and ppo outputs.
    """
    run_dir = Path(run_dir)
    stages = load_run(run_dir)
    run_name = run_dir.resolve().name
    png = render_curves(run_name, stages)
    page = render_html(run_dir, run_name, stages, png)
    png_path, html_path = report_plot_path(run_dir), report_html_path(run_dir)
    write_bytes_atomic(png_path, png)
    write_text_atomic(html_path, page)
    return png_path, html_path


def report_main(argv: Sequence[str] | None = None) -> int:
    """``rlhf report RUN_DIR``: write the report and print the paths of the PNG and the HTML page."""
    parser = argparse.ArgumentParser(
        prog="rlhf report",
        description="Plot a run's training curves and write a self-contained HTML report under <run_dir>/report/.",
    )
    parser.add_argument("run_dir", help="the run directory the stages wrote to, e.g. runs/demo")
    args = parser.parse_args(argv)
    for path in write_report(args.run_dir):
        print(path)
    return 0
