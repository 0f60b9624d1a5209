"""PPO, the main command: with no arguments it runs the demo end to end.

    accelerate launch launch/ppo.py [--config configs/ppo/demo.yaml] [key.sub=value ...]

Missing upstream outputs of the run (SFT, reward model) are built first with their demo configs when this is one
process; with several processes the error names the command to run first.
"""

import sys

from rlhf.launcher import default_config_path, launch
from stages import ppo

if __name__ == "__main__":
    sys.exit(launch(ppo.run_with_upstream, ppo.Config, default_config=default_config_path("ppo"),
                    prog="launch/ppo.py"))
