"""Run under `torchrun --nproc_per_node 2 -m tests.dist_prepare SPEC OUT`: kvd.run.assemble for
SPEC (a GGUF teacher, an empty $KVD_CACHE_DIR) in every process, with each GGUF conversion
logged to OUT/convert-rank{R}.json as [start, end] (time.monotonic, one clock for the machine)
and OUT/done-rank{R} written when the process holds its parts (tests/test_distributed.py)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import kvd.sources.gguf_file as gguf_file
from kvd.core.runtime import close_process_group, setup_runtime
from kvd.run.assemble import assemble
from kvd.spec import load_spec


def run(spec_path: str, out: str) -> None:
    rank = os.environ["RANK"]
    write = gguf_file.write_converted
    spans: list[list[float]] = []

    def logged(*args: Any, **kwargs: Any) -> None:
        start = time.monotonic()
        write(*args, **kwargs)
        time.sleep(1.0)  # a conversion long enough that the other process would overlap it
        spans.append([start, time.monotonic()])

    gguf_file.write_converted = logged
    rt = setup_runtime("cpu")
    spec = load_spec(Path(spec_path))
    assemble(spec, rt, Path(spec_path).parent, use_cache=False)
    Path(out, f"convert-rank{rank}.json").write_text(json.dumps(spans))
    Path(out, f"done-rank{rank}").touch()
    close_process_group(clean=True)


if __name__ == "__main__":
    run(*sys.argv[1:3])
