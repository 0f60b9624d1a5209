"""The whole pipeline: SFT -> reward model -> PPO -> evaluation -> report, each stage not up to date as its own
accelerate process (with the accelerate config the pipeline gives it).

    python launch/pipeline.py [--config configs/pipeline/demo.yaml] [--from STAGE | --only STAGE] [--force]
                              [--resume] [--dry-run] [STAGE.key=value ...]

The same as ``rlhf run configs/pipeline/demo.yaml``.
"""

import sys

from rlhf.launcher import default_config_path
from rlhf.pipeline import pipeline_main

if __name__ == "__main__":
    sys.exit(pipeline_main(default_config=default_config_path("pipeline"), prog="launch/pipeline.py"))
