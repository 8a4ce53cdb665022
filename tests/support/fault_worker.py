"""The training CLI with a fault injected, for tests: ``python tests/fault_worker.py KEY=VALUE ...``.

``LONGTRAIN_TEST_FAULT=exit:RANK:STEP`` makes rank RANK leave abruptly (``os._exit(1)``, no
clean-up, as a crashed or OOM-killed process would) when it is about to start step STEP;
``hang:RANK:STEP`` makes it sleep there instead (a stuck rank). Other ranks run normally.
"""
from __future__ import annotations

import os
import time

from longtrain import train
from longtrain.trainer.loop import Trainer


def inject(spec: str) -> None:
    kind, rank, step = spec.split(":")
    if int(os.environ.get("RANK", "0")) != int(rank):
        return
    real = Trainer.train_step

    def train_step(self):
        if self.step + 1 == int(step):
            if kind == "exit":
                os._exit(1)
            time.sleep(3600)
        return real(self)

    Trainer.train_step = train_step


if __name__ == "__main__":
    inject(os.environ["LONGTRAIN_TEST_FAULT"])
    train.main()
