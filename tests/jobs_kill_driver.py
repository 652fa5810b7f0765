"""Run a compatzoo CLI job and SIGKILL this process at a chosen point, as a machine
failure would: ``python jobs_kill_driver.py POINT N -- compatzoo-args...``.

POINT: ``chunk`` (the N-th chunk written into a partial output: mid-file), ``commit`` (just
after the N-th output is renamed into place, before the manifest records it: between
files) or ``manifest`` (inside the N-th manifest write, after its temporary file is
written and before it replaces the manifest). Under torchrun, ``KILL_RANK`` chooses the
rank that dies (the others run on until torchrun stops them)."""

import os
import signal
import sys

from compatzoo.jobs import stores


def kill_at(point: str, n: int) -> None:
    calls = {"count": 0}

    def tick() -> None:
        calls["count"] += 1
        if calls["count"] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    if point == "chunk":
        for cls in (stores._NpyWriter, stores._ParquetWriter, stores._FaissWriter):
            original = cls.write

            def write(self, features, carried, original=original):
                original(self, features, carried)
                tick()

            cls.write = write
    elif point == "commit":
        original_replace = os.replace

        def replace(src, dst):
            original_replace(src, dst)
            if not str(dst).endswith(".json"):
                tick()

        stores.os.replace = replace
    elif point == "manifest":
        original_replace = os.replace

        def replace(src, dst):
            if str(dst).endswith("compatzoo-job.json"):
                tick()
            original_replace(src, dst)

        stores.os.replace = replace
    else:
        raise SystemExit(f"unknown kill point {point}")


if __name__ == "__main__":
    point, n, separator, *args = sys.argv[1:]
    assert separator == "--"
    if os.environ.get("RANK", "0") == os.environ.get("KILL_RANK", "0"):
        kill_at(point, int(n))
    from compatzoo.cli import main

    raise SystemExit(main(args))
