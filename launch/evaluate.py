"""Held-out evaluation of a run: SFT policy vs PPO policy.

    accelerate launch launch/evaluate.py [--config configs/evaluate/demo.yaml] [key.sub=value ...]
"""

import sys

from rlhf.launcher import default_config_path, launch
from stages import evaluate

if __name__ == "__main__":
    sys.exit(launch(evaluate.run, evaluate.Config, default_config=default_config_path("evaluate"),
                    prog="launch/evaluate.py"))
