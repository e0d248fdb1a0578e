"""Ray worker set-up for tests/test_runner_ray.py (`worker_process_setup_hook`): a run whose output dir holds the
file KILL kills its own worker process with SIGKILL right after its first complete checkpoint, as a lost node or
the out-of-memory killer would. The file is renamed to KILLED first, so only the first attempt dies."""

from __future__ import annotations

import os
import signal
from pathlib import Path

KILL, KILLED = "KILL_AFTER_FIRST_CHECKPOINT", "KILLED"


def install() -> None:
    from peftlab.runner.train import RunnerTrainer

    save = RunnerTrainer._save_checkpoint

    def save_then_die(self, model, trial) -> None:
        save(self, model, trial)
        marker = Path(self.args.output_dir) / KILL
        if marker.exists():
            marker.rename(marker.with_name(KILLED))
            os.kill(os.getpid(), signal.SIGKILL)

    RunnerTrainer._save_checkpoint = save_then_die
