"""Run ``compatzoo run`` and SIGKILL this process at a chosen point, as a machine failure
would: ``python run_kill_driver.py POINT -- compatzoo-args...``.

POINT: ``none``; ``step:DESC:N`` (the N-th training step of the fit named DESC, e.g. a
generation's name or ``bict psi``; N counts the steps this process ran); ``stage:NAME``
(just after the run manifest records stage NAME, e.g. ``train/old``); ``report`` (while
the results are written, before they are published)."""

import os
import signal
import sys

import torch

from compatzoo.cli import main


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at(point: str) -> None:
    kind, _, where = point.partition(":")
    if kind == "step":
        import compatzoo.engine.fitting as fitting

        desc, n = where.rsplit(":", 1)
        original, seen = fitting.check_finite, {"count": 0}

        def check_finite(values, name, epoch, step):
            original(values, name, epoch, step)
            if name == desc:
                seen["count"] += 1
                if seen["count"] == int(n):
                    die()

        fitting.check_finite = check_finite
    elif kind == "stage":
        from compatzoo.run_folder import RunFolder

        original_mark = RunFolder.mark_done

        def mark_done(self, stage, record):
            original_mark(self, stage, record)
            if stage == where:
                die()

        RunFolder.mark_done = mark_done
    elif kind == "report":
        import compatzoo.report as report

        original_write = report.write

        def write(result, directory):
            original_write(result, directory)
            die()

        report.write = write


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    point, separator, *args = sys.argv[1:]
    assert separator == "--"
    kill_at(point)
    sys.exit(main(args))
