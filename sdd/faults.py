"""Fault injection, for tests only: a process SIGKILLs itself, or stops and waits, at a named point.

Kill tests used to poll the store and race the clock for the moment to kill; on a fast machine the
moment was gone before the poll saw it. Here the step itself stops exactly at the named event.
Nothing happens unless `SDD_FAULT` is set; product behaviour does not depend on this module.

    SDD_FAULT="POINT:COUNT[:ACTION][,POINT:COUNT[:ACTION]...]"

fires on the COUNT-th arrival at POINT. ACTION is `kill` (SIGKILL this process; the default) or
`pause` (write the record below, then wait to be killed by the test; after `SDD_FAULT_PAUSE_S`
seconds, default 900, the process exits hard so a forgotten pause cannot hang CI).

`SDD_FAULT_DIR` (optional) is a folder shared by the processes of one test: arrivals are counted
there across processes, so COUNT 2 means the second arrival in any of them (a Ray worker's retry
included), and each fired rule leaves `<POINT>.json` with {"point", "action", "pid", "run_id"}, which
tells the test which process stopped and in which run. Without it, arrivals count per process.

`SDD_FAULT_SNAPSHOT_EPOCHS=N` makes training write its resume checkpoint after every N epochs, so
a kill point can sit just after a checkpoint whatever the machine's speed.

Points (E an epoch, L a level, S a sweep stage):
    train-epoch-E      a dense run has evaluated epoch E
    train-saved-E      a dense run has written its resume checkpoint at epoch E
    level-L-epoch-E    level L of a chain has retrained epoch E
    level-L-saved-E    level L has written its resume checkpoint at epoch E
    level-L-done       level L is FINISHED and logged on its chain
    stage-S-done       the sweep stage run S is FINISHED
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

FAULT_VAR = "SDD_FAULT"
DIR_VAR = "SDD_FAULT_DIR"
PAUSE_VAR = "SDD_FAULT_PAUSE_S"
SNAPSHOT_VAR = "SDD_FAULT_SNAPSHOT_EPOCHS"
ACTIONS = ("kill", "pause")
VARIABLES = (FAULT_VAR, DIR_VAR, PAUSE_VAR, SNAPSHOT_VAR)

_arrivals: dict[str, int] = {}  # per-process counts, used only without SDD_FAULT_DIR


def rules(spec: str) -> dict[str, tuple[int, str]]:
    """{point: (count, action)} from an `SDD_FAULT` value; ValueError if malformed."""
    out: dict[str, tuple[int, str]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, rest = item.partition(":")
        count, _, action = rest.partition(":")
        action = action or "kill"
        if not point or not count.isdigit() or int(count) < 1 or action not in ACTIONS:
            raise ValueError(f"{FAULT_VAR}: {item!r} is not POINT:COUNT[:kill|pause]")
        out[point] = (int(count), action)
    return out


def reach(point: str, run_id: str | None = None) -> None:
    """Mark an arrival at `point`; acts if a rule of `SDD_FAULT` fires here. Free when unset."""
    spec = os.environ.get(FAULT_VAR)
    if not spec:
        return
    rule = rules(spec).get(point)
    if rule is None:
        return
    count, action = rule
    folder = os.environ.get(DIR_VAR)
    if _arrival(point, Path(folder) if folder else None) != count:
        return
    record = {"point": point, "action": action, "pid": os.getpid(), "run_id": run_id}
    if folder:
        _write_atomically(Path(folder) / f"{point}.json", json.dumps(record))
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    deadline = time.monotonic() + float(os.environ.get(PAUSE_VAR, "900"))
    while time.monotonic() < deadline:
        time.sleep(0.2)
    os._exit(99)  # nobody came: leave without finishing anything


def snapshot_epochs() -> int:
    """Epochs between forced resume checkpoints (`SDD_FAULT_SNAPSHOT_EPOCHS`), 0 when unset."""
    return int(os.environ.get(SNAPSHOT_VAR) or 0)


def forwarded_environment() -> dict[str, str]:
    """The fault variables of this process, for processes it starts elsewhere (Ray workers)."""
    return {name: os.environ[name] for name in VARIABLES if os.environ.get(name)}


def _arrival(point: str, folder: Path | None) -> int:
    """This arrival's number: an exclusive create per arrival makes the count safe across processes."""
    if folder is None:
        _arrivals[point] = _arrivals.get(point, 0) + 1
        return _arrivals[point]
    folder.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        try:
            os.close(os.open(folder / f"{point}.arrival{number}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return number
        except FileExistsError:
            number += 1


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
