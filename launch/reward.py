"""Reward-model training on preference pairs.

    accelerate launch launch/reward.py [--config configs/reward/demo.yaml] [key.sub=value ...]
"""

import sys

from rlhf.launcher import default_config_path, launch
from stages import reward

if __name__ == "__main__":
    sys.exit(launch(reward.run, reward.Config, default_config=default_config_path("reward"),
                    prog="launch/reward.py"))
