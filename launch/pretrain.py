"""Pretrain a tiny base model from scratch.

    accelerate launch launch/pretrain.py [--config configs/pretrain/demo.yaml] [key.sub=value ...]
"""

import sys

from rlhf.launcher import default_config_path, launch
from stages import pretrain

if __name__ == "__main__":
    sys.exit(launch(pretrain.run, pretrain.Config, default_config=default_config_path("pretrain"),
                    prog="launch/pretrain.py"))
