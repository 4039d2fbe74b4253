"""Test helper run by torchrun: `moe-train`, except that rank $CRASH_RANK exits abruptly (os._exit, no cleanup)
before step $CRASH_AT_STEP, once: the file $CRASH_MARKER records that it did, so the restarted job runs through."""

from __future__ import annotations

import os

from moe_train.train import main
from moe_train.training.trainer import Trainer

_run_one_step = Trainer.run_one_step


def run_one_step_or_crash(self, *args):
    marker = os.environ["CRASH_MARKER"]
    if (self.step + 1 == int(os.environ["CRASH_AT_STEP"]) and self.rank == int(os.environ["CRASH_RANK"])
            and not os.path.exists(marker)):
        open(marker, "w").close()
        os._exit(3)
    return _run_one_step(self, *args)


if __name__ == "__main__":
    Trainer.run_one_step = run_one_step_or_crash
    main()
