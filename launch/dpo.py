"""Direct preference optimisation of the SFT policy on preference pairs.

    accelerate launch launch/dpo.py [--config configs/dpo/demo.yaml] [key.sub=value ...]
"""

import sys

from rlhf.launcher import default_config_path, launch
from stages import dpo

if __name__ == "__main__":
    sys.exit(launch(dpo.run, dpo.Config, default_config=default_config_path("dpo"), prog="launch/dpo.py"))
