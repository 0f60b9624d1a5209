"""Supervised fine-tuning.

    accelerate launch launch/sft.py [--config configs/sft/demo.yaml] [key.sub=value ...]
"""

import sys

from rlhf.launcher import default_config_path, launch
from stages import sft

if __name__ == "__main__":
    sys.exit(launch(sft.run, sft.Config, default_config=default_config_path("sft"), prog="launch/sft.py"))
