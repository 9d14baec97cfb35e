"""The shipped study files (presets), found by name from any directory: `sdd study mnist1d_quick`.

They live in the package (`sdd/presets/`, also reachable as `sweeps/` in a source checkout), so a
`pip install` user has them too. A path that exists is used as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SUFFIX = ".yaml"
DEFAULT = "mnist1d_quick"  # the default study of `sdd study` and `make study`
LINE = 100  # characters of a description `sdd presets` shows


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    description: str
    cost: str


def folder() -> Path:
    return Path(str(resources.files("sdd") / "presets"))


def resolve(file: str | Path) -> Path:
    """`file` if it exists; else the preset of that name (`mnist1d_quick` or `mnist1d_quick.yaml`);
    else `file` unchanged, so that loading it reports it missing."""
    path = Path(file)
    if path.exists() or path.parent != Path("."):
        return path
    name = path.name[:-len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name
    checkout = Path("sweeps") / f"{name}{SUFFIX}"  # the same file, under the name a checkout's studies used
    if checkout.is_file():
        return checkout
    shipped = folder() / f"{name}{SUFFIX}"
    return shipped if shipped.is_file() else path


def available() -> list[Preset]:
    """Every preset with its one-line description and its cost (measured or estimated)."""
    import yaml

    out = []
    for path in sorted(folder().glob(f"*{SUFFIX}")):
        data = yaml.safe_load(path.read_text()) or {}
        description = " ".join(str(data.get("description", "")).split())
        line = description if len(description) <= LINE else description[:LINE - 1].rsplit(" ", 1)[0] + " …"
        out.append(Preset(path.name[:-len(SUFFIX)], path, line,
                          " ".join(str(data.get("cost", "not stated")).split())))
    return out


def find(file: str | Path) -> Path:
    """`resolve`, or a UsageError naming the presets when nothing of that name exists."""
    from sdd.errors import UsageError

    path = resolve(file)
    if not path.exists():
        shipped = ", ".join(preset.name for preset in available())
        raise UsageError(f"study file {file} not found (a path, or a preset: {shipped})")
    return path
