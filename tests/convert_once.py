"""Run as `python -m tests.convert_once GGUF OUT NAME` (with $KVD_CACHE_DIR set): write
OUT/NAME.ready, wait for OUT/go, then kvd's converted_dir(GGUF), each conversion held 2 s
longer and logged; OUT/NAME.json is {"dir": the converted dir, "conversions": how many this
process made} (tests/test_sources.py: two processes at once convert once)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import kvd.sources.gguf_file as gguf_file


def run(gguf: str, out: str, name: str) -> None:
    write = gguf_file.write_converted
    made: list[int] = []

    def slow(*args: Any, **kwargs: Any) -> None:
        write(*args, **kwargs)
        time.sleep(2.0)  # long enough that the other process arrives while this one converts
        made.append(1)

    gguf_file.write_converted = slow
    Path(out, f"{name}.ready").touch()
    while not Path(out, "go").exists():
        time.sleep(0.01)
    target = gguf_file.converted_dir(Path(gguf))
    Path(out, f"{name}.json").write_text(json.dumps({"dir": str(target), "conversions": len(made)}))


if __name__ == "__main__":
    run(*sys.argv[1:4])
