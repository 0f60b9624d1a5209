"""PPO, the main command: with no arguments it runs the demo end to end.

    accelerate launch launch/ppo.py [--config configs/ppo/demo.yaml] [key.sub=value ...]

Missing upstream outputs of the run (SFT, reward model) are built first with their demo configs when this is one
process; with several processes the error names the command to run first.
"""

import sys
from pathlib import Path

from rlhf.launcher import default_config_path, launch
from rlhf.pipeline import run_with_upstream
from stages import ppo


def main(cfg: ppo.Config) -> Path:
    return run_with_upstream(cfg, ppo.run)


if __name__ == "__main__":
    sys.exit(launch(main, ppo.Config, default_config=default_config_path("ppo"), prog="launch/ppo.py"))
