"""The figures of `sdd bench` and their two outputs: the printed table and the JSON document."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Figure:
    """One row of the table: ratio = a / b (medians over repeats of the per-repeat ratios)."""

    item: int
    name: str
    measure: str  # what a and b are, e.g. "samples/s: sdd.fit / DataLoader loop"
    ratio: float
    a: float
    b: float
    unit: str
    target: str | None = None  # e.g. ">= 1.5" or "<= 0.10"
    repeats: int = 1
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        op, bound = self.target.split()
        return self.ratio >= float(bound) if op == ">=" else self.ratio <= float(bound)


@dataclass
class Report:
    size: str
    device: str
    environment: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {"size": self.size, "device": self.device, "environment": self.environment,
                "seconds": round(self.seconds, 1),
                "figures": [{**asdict(f), "met": f.met} for f in self.figures], "skipped": self.skipped}


def _show(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value:,.0f} B"
    if unit == "samples/s":
        return f"{value:,.0f}/s"
    if unit == "s":
        return f"{value:.3g} s"
    if unit == "ms":
        return f"{value:.3g} ms"
    if unit == "cases":
        return f"{value:.0f}"
    return f"{value:.3f}"


def format_table(report: Report) -> str:
    env = report.environment
    lines = [
        f"sdd bench ({report.size}) on {report.device}: torch {env['torch']}, {env['cpus']} CPUs, "
        f"{env['threads']} torch thread(s), load average {env['load_average_start']} at start and "
        f"{env['load_average_end']} at the end; {report.seconds:.0f}s",
        "ratio = A / B as each row's measure names them: the median of the per-repeat ratios (A, B: their own "
        "medians). Speed-ups of the project over its baseline (items 1, 3 log_batch, 4, 6, 7) are oriented so that "
        "> 1 means the project is better; costs (items 2, 3 share, 5) meet their target at or below it. "
        "Absolute numbers move with the machine's load, ratios much less.",
        "",
    ]
    rows = [("#", "figure", "measure (A / B)", "ratio", "target", "met", "A", "B", "n")]
    for f in report.figures:
        met = {True: "yes", False: "NO", None: ""}[f.met]
        rows.append((str(f.item), f.name, f.measure, f"{f.ratio:.3f}", f.target or "", met, _show(f.a, f.unit),
                     _show(f.b, f.unit), str(f.repeats)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    for f in report.figures:
        if f.note:
            lines.append(f"note ({f.item}, {f.name}): {f.note}")
    for s in report.skipped:
        lines.append(f"item {s['item']} skipped: {s['reason']}")
    return "\n".join(lines)
