"""How cost grows: tokens/s and step overhead against sequence length, number of teachers (1..5)
and student width, on the heterogeneous random teachers of benchmarks/setups.py.

    python -m benchmarks.scaling [--smoke] [--repeats N] [--device cuda]

Each row is one setup measured like benchmarks/step_overhead.py (kvd and efficient bare steps
alternating on the same batches); the other two axes stay at the 3-teacher default (seq_len 128,
student width 128).
"""

from __future__ import annotations

from typing import Any

from benchmarks.harness import (
    arguments,
    build_trainer,
    ce_only,
    step_overhead,
    table,
    with_kvd_allocator,
    write_section,
)
from benchmarks.setups import teachers


def axes(smoke: bool) -> list[tuple[str, int, dict[str, Any]]]:
    """(axis, value, keyword arguments of `teachers`) per row."""
    if smoke:
        base: dict[str, Any] = {"batch_size": 2, "scale": 0.25, "seq_len": 32, "student_hidden": 64}
        return [
            ("seq_len", 16, base | {"n": 2, "seq_len": 16}),
            ("seq_len", 32, base | {"n": 2}),
            ("teachers", 1, base | {"n": 1}),
            ("student_hidden", 32, base | {"n": 2, "student_hidden": 32}),
        ]
    base = {"n": 3}
    return (
        [("seq_len", v, base | {"seq_len": v}) for v in (64, 128, 256, 512)]
        + [("teachers", v, {"n": v}) for v in (1, 2, 3, 4, 5)]
        + [("student_hidden", v, base | {"student_hidden": v}) for v in (64, 256, 512)]
    )


def main() -> None:
    with_kvd_allocator("benchmarks.scaling")
    args = arguments(__doc__ or "")
    rows = []
    for axis, value, kwargs in axes(args.smoke):
        data = teachers(**kwargs)
        trainer = build_trainer(data, args.device)
        params = sum(p.numel() for p in trainer.student.model.parameters())
        o = step_overhead(trainer, args.repeats, ce=build_trainer(ce_only(data), args.device))
        del trainer
        rows.append(
            [
                axis,
                value,
                f"{params / 1e6:.1f}M",
                o.tokens,
                o.bare_s,
                o.kvd_s,
                f"{o.tokens / o.kvd_s:.0f}",
                f"{o.tokens / o.bare_s:.0f}",
                o.ratio,
            ]
        )
        print(f"{axis}={value}: {o.tokens / o.kvd_s:.0f} tokens/s, overhead {o.ratio:.3f}")
    body = (
        f"Medians of {args.repeats} steps per side, measured as in the step overhead section "
        "(against the efficient bare: teacher forwards + kvd's CE-only student step); the "
        "default row is 3 teachers, seq_len 128, student width 128 (batch 8).\n\n"
        + table(
            [
                "axis",
                "value",
                "student params",
                "student tokens/step",
                "bare step s",
                "kvd step s",
                "kvd tokens/s",
                "bare tokens/s",
                "step ratio",
            ],
            rows,
        )
    )
    write_section(args.results, "scaling", "Scaling with sequence length, teachers, student", body)


if __name__ == "__main__":
    main()
