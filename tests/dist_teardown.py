"""Run under `torchrun --nproc_per_node 2 -m tests.dist_teardown MODE SPEC OUT`: `kvd train SPEC
--baseline` (two trainings in one process) through kvd.cli.app.main, in a process group main
opens (MODE own) or in one this script opened first (MODE callers); writes OUT/rank{R}.json with
main's exit code and whether a process group is left after it (tests/test_distributed.py reads
it)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from kvd.cli.app import main


def run(mode: str, spec: str, out: str) -> None:
    if mode == "callers":
        dist.init_process_group("gloo")
    code = main(["train", spec, "--baseline", "--set", f"output.dir={out}/{mode}"])
    left = dist.is_initialized()
    if left:
        dist.destroy_process_group()
    report = {"code": code, "group_left": left}
    Path(out, f"{mode}-rank{os.environ['RANK']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    run(*sys.argv[1:4])
