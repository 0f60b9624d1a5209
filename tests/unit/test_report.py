"""Tests of rlhf.report: the curves PNG, the self-contained HTML page and ``rlhf report`` on hand-built run dirs."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest

from rlhf import cli
from rlhf.checkpoint import (
    config_path,
    eval_results_path,
    metrics_path,
    report_html_path,
    report_plot_path,
    samples_path,
    stage_output_dir,
    write_json_atomic,
    write_manifest,
)
from rlhf.errors import CheckpointError
from rlhf.report import curves_figure, load_run, moving_average, write_report

NUM_UPDATES = 20
ROLLOUT_BATCH = 8
KL_COEF = 0.1
ESCAPED_RESPONSE = " it is <b>great</b> & cheap ."


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_stage(run: Path, stage: str, records: list[dict], *, config: dict, metrics: dict, config_text: str,
                complete: bool = True) -> Path:
    out = stage_output_dir(run, stage)
    write_jsonl(metrics_path(out), [*records, {"summary": metrics, "time": 2.0}])
    config_path(out).write_text(config_text, encoding="utf-8")
    if complete:
        write_manifest(out, stage=stage, fingerprint=f"{stage}-fp-0123", config=config, inputs={}, seed=0,
                       metrics=metrics)
    return out


def write_sft(run: Path) -> None:
    records = [{"step": step, "time": 1.0, "train/loss": 2.0 - 0.05 * step} for step in range(1, 21)]
    records += [{"step": 10, "time": 1.0, "eval/loss": 1.7}, {"step": 20, "time": 1.0, "eval/loss": 1.4}]
    write_stage(run, "sft", records, config={"train": {"batch_size": 4}},
                metrics={"train/loss": 1.0, "eval/loss": 1.4, "eval/perplexity": math.exp(1.4)},
                config_text="model:\n  name_or_path: tiny-sft-base\n")


def write_reward(run: Path) -> None:
    records = [{"step": step, "time": 1.0, "train/loss": 0.7 - 0.01 * step, "train/accuracy": 0.5 + 0.01 * step}
               for step in range(1, 21)]
    records += [{"step": 20, "time": 1.0, "eval/accuracy": 0.72}]
    write_stage(run, "reward", records, config={"train": {"batch_size": 4}},
                metrics={"train/loss": 0.5, "eval/accuracy": 0.72},
                config_text="model:\n  name_or_path: tiny-reward-base\n")


def ppo_update(step: int) -> dict:
    return {"step": step, "time": 1.0, "rollout/score_mean": 0.1 * step, "rollout/kl": 0.05 * step * step,
            "rollout/response_len": 10.0 + step, "rollout/eos_rate": 0.9, "ppo/kl_coef": KL_COEF,
            "ppo/value_loss": 1.0 / step, "ppo/policy_loss": -0.01}


def ppo_eval(step: int, score: float, gold: float) -> dict:
    return {"step": step, "time": 1.0, "eval/score_mean": score, "eval/gold_combined": gold,
            "eval/gold_positive": gold / 2}


def write_ppo(run: Path, *, config: dict | None = None, complete: bool = True) -> None:
    records = [ppo_eval(0, -0.25, 0.5), *(ppo_update(step) for step in range(1, NUM_UPDATES + 1)),
               ppo_eval(NUM_UPDATES, 1.75, 0.9)]
    config = {"rollout": {"batch_size": ROLLOUT_BATCH}} if config is None else config
    metrics = {"updates": NUM_UPDATES, "initial/score_mean": -0.25, "final/score_mean": 1.75,
               "initial/gold_combined": 0.5, "final/gold_combined": 0.9}
    out = write_stage(run, "ppo", records, config=config, metrics=metrics, complete=complete,
                      config_text=f"rollout:\n  batch_size: {ROLLOUT_BATCH}\n  temperature: 0.7\n")
    samples = [{"step": 0, "table": "eval_samples", "prompt": "the lamp", "response": " is old .", "score": -1.0}]
    samples += [{"step": NUM_UPDATES, "table": "rollout_samples", "prompt": "my fan", "response": " rollout .",
                 "score": 0.0}]
    samples += [{"step": NUM_UPDATES, "table": "eval_samples", "prompt": f"prompt {i}",
                 "response": ESCAPED_RESPONSE if i == 0 else f" response {i} .", "score": 1.0 + i}
                for i in range(12)]
    write_jsonl(samples_path(out), samples)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run = tmp_path / "my-run"
    write_sft(run)
    write_reward(run)
    write_ppo(run)
    # The shape the evaluate stage writes: numbers, one dict per policy, and the sampling settings.
    write_json_atomic(eval_results_path(run), {
        "num_prompts": 64,
        "settings": {"temperature": 0.7, "top_k": 0},
        "sft": {"score_mean": 0.25, "gold_positive": 0.5},
        "ppo": {"score_mean": 1.5, "gold_positive": 0.625},
        "win_rate_gold": 0.875,
    })
    return run


def panel_texts(fig) -> list[str]:
    """Every text drawn inside each of the eight main panels (twin axes excluded), in order (a) to (h)."""
    main = [ax for ax in fig.axes if ax.get_title()]
    return [" ".join(text.get_text() for text in ax.texts) for ax in main]


def raw_line(fig, panel: str):
    """The first line of the panel whose title starts with `panel`: the raw (unsmoothed) curve."""
    ax = next(ax for ax in fig.axes if ax.get_title().startswith(panel))
    return ax.get_lines()[0]


def test_write_report_writes_a_png_and_an_html_page_embedding_it(run: Path):
    from PIL import Image

    png_path, html_path = write_report(run)

    assert (png_path, html_path) == (report_plot_path(run), report_html_path(run))
    png = png_path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(png_path) as image:
        assert image.size[0] > 800 and image.size[1] > 600
    page = html_path.read_text(encoding="utf-8")
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match and base64.b64decode(match.group(1)) == png
    assert not list(png_path.parent.glob("*.tmp"))


def test_report_html_shows_stages_before_after_eval_samples_and_configs(run: Path):
    _, html_path = write_report(run)
    page = html_path.read_text(encoding="utf-8")

    assert "<title>RLHF report: my-run</title>" in page
    for stage in ("sft", "reward", "ppo"):
        assert f"<b>{stage}</b>" in page and f"{stage}-fp-0123" in page
    assert page.count('class="status complete"') == 3
    # Before -> after, score first: -0.25 -> 1.75 (+2), gold 0.5 -> 0.9 (+0.4).
    assert "<td>score_mean</td><td>-0.25</td><td>1.75</td><td>+2</td>" in page
    assert "<td>gold_combined</td><td>0.5</td><td>0.9</td><td>+0.4</td>" in page
    assert page.index("<td>score_mean</td>") < page.index("<td>gold_combined</td>")
    # eval.json (keys sorted by write_json_atomic): numbers as name/value, the policies as one matrix, the settings
    # as a table of their own.
    assert "<td>num_prompts</td><td>64</td></tr><tr><td>win_rate_gold</td><td>0.875</td>" in page
    assert "<th></th><th>gold_positive</th><th>score_mean</th>" in page
    assert "<td>ppo</td><td>0.625</td><td>1.5</td>" in page and "<td>sft</td><td>0.5</td><td>0.25</td>" in page
    assert "<th>settings</th><th></th>" in page and "<td>temperature</td><td>0.7</td>" in page
    # Samples: the last step of eval_samples, at most 10 rows, escaped.
    assert "eval_samples</code> at update 20, episode 160" in page
    assert " it is &lt;b&gt;great&lt;/b&gt; &amp; cheap ." in page and "<b>great</b>" not in page
    assert "prompt 9" in page and "prompt 10" not in page
    assert " is old ." not in page and " rollout ." not in page
    # Resolved configs, each in a details block.
    for name in ("tiny-sft-base", "tiny-reward-base", "temperature: 0.7"):
        assert name in page
    assert page.count("<details>") >= 3


def test_ppo_panels_use_episodes_and_score_minus_beta_kl(run: Path):
    fig = curves_figure("my-run", load_run(run))

    line = raw_line(fig, "(c)")
    steps = range(1, NUM_UPDATES + 1)
    assert list(line.get_xdata()) == [step * ROLLOUT_BATCH for step in steps]
    expected = [0.1 * step - KL_COEF * 0.05 * step * step for step in steps]
    assert list(line.get_ydata()) == pytest.approx(expected, abs=1e-12)
    evaluations = raw_line(fig, "(f)")
    assert list(evaluations.get_xdata()) == [0, NUM_UPDATES * ROLLOUT_BATCH]
    assert list(evaluations.get_ydata()) == [-0.25, 1.75]
    assert all("no data" not in text for text in panel_texts(fig))


def test_ppo_x_axis_falls_back_to_updates_without_a_batch_size(tmp_path: Path):
    run = tmp_path / "run"
    write_ppo(run, config={})
    fig = curves_figure("run", load_run(run))

    assert list(raw_line(fig, "(a)").get_xdata()) == list(range(1, NUM_UPDATES + 1))
    assert next(ax for ax in fig.axes if ax.get_title().startswith("(a)")).get_xlabel() == "PPO update"


def test_incomplete_ppo_is_reported_from_its_logs_and_config_yaml(tmp_path: Path):
    run = tmp_path / "run"
    write_ppo(run, complete=False)
    stages = load_run(run)
    fig = curves_figure("run", stages)

    assert stages["ppo"].status == "incomplete"
    assert raw_line(fig, "(a)").get_xdata()[-1] == NUM_UPDATES * ROLLOUT_BATCH
    _, html_path = write_report(run)
    page = html_path.read_text(encoding="utf-8")
    assert 'class="status incomplete"' in page and "last logged step 20" in page


def test_a_run_with_only_sft_reports_no_data_for_the_other_panels(tmp_path: Path):
    run = tmp_path / "sft-only"
    write_sft(run)
    fig = curves_figure("sft-only", load_run(run))

    texts = panel_texts(fig)
    assert len(texts) == 8
    assert all(text.startswith("no data") for text in texts[:6] + texts[7:])
    assert "ppo/ is missing" in texts[0] and "reward/ is missing" in texts[7]
    assert texts[6] == ""
    png_path, html_path = write_report(run)
    page = html_path.read_text(encoding="utf-8")
    assert png_path.is_file()
    assert page.count('class="status missing"') == 2
    assert "before \u2192 after" not in page and "Sample responses" not in page and "Evaluation</h2>" not in page


def write_dpo(run: Path, beta: float = 0.5) -> None:
    records = [{"step": step, "time": 1.0, "train/loss": 0.69 - 0.01 * step, "train/rewards/chosen": -0.02 * step,
                "train/rewards/margins": 0.03 * step, "train/rewards/accuracies": 0.5 + 0.02 * step}
               for step in range(1, 11)]
    records += [{"step": 10, "time": 1.0, "eval/loss": 0.6, "eval/rewards/margins": 0.25,
                 "eval/rewards/accuracies": 0.7}]
    write_stage(run, "dpo", records, config={"beta": beta}, config_text=f"beta: {beta}\n",
                metrics={"train/loss": 0.59, "eval/accuracy": 0.7, "eval/margin": 0.25, "eval/logratio_chosen": -0.4})


def test_an_alarm_is_marked_on_every_ppo_panel_at_its_update(tmp_path: Path):
    run = tmp_path / "run"
    write_ppo(run)
    out = stage_output_dir(run, "ppo")
    rows = [json.loads(line) for line in metrics_path(out).read_text().splitlines()]
    rows.insert(6, {"step": 5, "time": 1.0, "alarm/fired/repetition": 1.0})
    write_jsonl(metrics_path(out), rows)
    fig = curves_figure("run", load_run(run))
    marked = [ax.get_title()[:3] for ax in fig.axes
              if any(line.get_label() == "alarm: repetition" and list(line.get_xdata()) == [5 * ROLLOUT_BATCH] * 2
                     for line in ax.get_lines())]
    assert marked == ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)"]


def test_the_reward_models_report_is_a_section_of_the_page(run: Path):
    _, html_path = write_report(run)
    assert "Reward model on its held-out pairs" not in html_path.read_text(encoding="utf-8")  # no report recorded
    out = stage_output_dir(run, "reward")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["gate"] = {"min_eval_accuracy": 0.6, "eval_accuracy": 0.72, "passed": True}
    manifest["report"] = {
        "num_pairs": 40, "accuracy": 0.72, "length_correlation": 0.31, "expected_calibration_error": 0.04,
        "gold_pairs": 36, "gold_agreement": 0.694,
        "by_length": [{"min_length": 3, "max_length": 9, "pairs": 20, "accuracy": 0.8},
                      {"min_length": 9.5, "max_length": 20, "pairs": 20, "accuracy": 0.64}],
        "calibration": [{"confidence": [0.5, 0.6], "pairs": 25, "mean_confidence": 0.55, "accuracy": 0.6},
                        {"confidence": [0.9, 1.0], "pairs": 15, "mean_confidence": 0.93, "accuracy": 0.93}]}
    write_json_atomic(out / "manifest.json", manifest)
    _, html_path = write_report(run)
    page = html_path.read_text(encoding="utf-8")
    section = page[page.index("Reward model on its held-out pairs"):page.index("</table>", page.index("Calibration"))]
    for text in ("passed (0.6)", "0.31", "agreement with the gold judge (36 pairs it does not tie)", "0.694",
                 "9.5\u201320", "0.9\u20131", "0.93"):
        assert text in section, text


def test_a_dpo_stage_adds_its_two_panels_and_its_row(run: Path):
    without = curves_figure("my-run", load_run(run))
    assert len(panel_texts(without)) == 8 and "dpo" not in load_run(run)
    write_dpo(run, beta=0.5)
    stages = load_run(run)
    fig = curves_figure("my-run", stages)

    texts = panel_texts(fig)
    assert len(texts) == 10 and all("no data" not in text for text in texts)
    # (i): the loss, then the chosen responses' log-ratio (the implicit reward over beta) on its own axis.
    loss_ax = next(ax for ax in fig.axes if ax.get_title().startswith("(i)"))
    assert list(loss_ax.get_lines()[0].get_ydata()) == pytest.approx([0.69 - 0.01 * s for s in range(1, 11)])
    logratio = next(line for ax in fig.axes for line in ax.get_lines() if line.get_label() == "log-ratio, chosen")
    assert list(logratio.get_ydata()) == pytest.approx([-0.02 * s / 0.5 for s in range(1, 11)])
    assert list(raw_line(fig, "(j)").get_ydata()) == pytest.approx([0.03 * s for s in range(1, 11)])
    _, html_path = write_report(run)
    page = html_path.read_text(encoding="utf-8")
    assert "<b>dpo</b>" in page and "eval/logratio_chosen" in page


def test_missing_run_dir_raises_an_error_naming_it(tmp_path: Path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        write_report(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=re.escape(str(empty)) + ".*none of the stage outputs"):
        write_report(empty)


def test_cli_report_prints_both_paths_and_exits_2_on_a_missing_dir(run: Path, tmp_path: Path, capsys):
    assert cli.main(["report", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [str(report_plot_path(run)), str(report_html_path(run))]

    missing = tmp_path / "nowhere"
    assert cli.main(["report", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err


def test_moving_average_is_centred_and_skips_nans():
    assert list(moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 3)) == pytest.approx([1.5, 2.0, 3.0, 4.0, 4.5])
    assert list(moving_average([1.0, math.nan, 3.0], 3)) == pytest.approx([1.0, 2.0, 3.0])
