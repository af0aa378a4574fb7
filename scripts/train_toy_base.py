"""Train (or continue training) the toy shapes world's base generator.

    python scripts/train_toy_base.py --out diffalign/toyworld/weights/shapes-unet --steps 6000 --seed 0

Re-running with a larger --steps resumes from the state file (raw + EMA weights, optimiser, data RNG); pass
--fresh to start over. Every field of PretrainConfig is an option (--help lists them); the logic lives in
diffalign/toyworld/pretrain.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffalign.toyworld.pretrain import PretrainConfig, pretrain  # noqa: E402
from diffalign.toyworld.pretrain_common import run_script  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_script(PretrainConfig, pretrain, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
