"""Result files: merging the results of several processes, and finding the committed ones.

Legend: a result is the dict a sweep returns (kind "device"); docs/results/ holds the committed runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from .sweep import summarize

__all__ = ["merge_results", "read_device_results", "find_results_dir", "load_device_results"]


def merge_results(parts: list[dict]) -> dict:
    """One device result from several (e.g. one process per shape): rows, skips and notes concatenated, the
    derived tables recomputed; `parts` keeps each part's shapes, limits, machine date, completeness."""
    if not isinstance(parts, (list, tuple)) or not parts:
        raise ValueError(f"parts must be a non-empty list of device results, got {parts!r:.80}")
    seen: dict[str, int] = {}
    for i, p in enumerate(parts):
        if not isinstance(p, dict) or p.get("kind") != "device":
            kind = p.get("kind") if isinstance(p, dict) else type(p).__name__
            raise ValueError(f"parts[{i}] is not a device result (kind {kind!r})")
        for name in p.get("shapes", {}):
            if name in seen:
                raise ValueError(f"parts[{i}] and parts[{seen[name]}] both hold shape {name!r}")
            seen[name] = i
    first = parts[0]
    settings = dict(first.get("settings", {}))
    settings.update(shapes=list(seen), providers=_union(p.get("settings", {}).get("providers", []) for p in parts),
                    tokens=sorted(set(_union(p.get("settings", {}).get("tokens", []) for p in parts))))
    merged = dict(kind="device", machine=first.get("machine", {}), complete=all(p.get("complete") for p in parts),
                  settings=settings, limits=next((p["limits"] for p in parts if p.get("limits")), None),
                  shapes={k: v for p in parts for k, v in p.get("shapes", {}).items()},
                  rows=[r for p in parts for r in p.get("rows", [])],
                  skipped=[s for p in parts for s in p.get("skipped", [])],
                  notes=[n for p in parts for n in p.get("notes", [])],
                  elapsed_s=sum(p.get("elapsed_s", 0.0) for p in parts),
                  parts=[dict(shapes=list(p.get("shapes", {})), complete=bool(p.get("complete")),
                              stopped=p.get("stopped"), date=p.get("machine", {}).get("date"),
                              elapsed_s=p.get("elapsed_s"), limits=p.get("limits"),
                              time_limit_s=p.get("settings", {}).get("time_limit_s")) for p in parts])
    summarize(merged)
    return merged


def _union(lists) -> list:
    out: list = []
    for xs in lists:
        out += [x for x in xs if x not in out]
    return out


def read_device_results(paths: list[Path]) -> tuple[list[dict], list[str]]:
    """The device results among `paths`, and a note for each file that is missing, unreadable or not one."""
    parts, notes = [], []
    for path in paths:
        try:
            res = json.loads(Path(path).read_text())
        except FileNotFoundError:
            notes.append(f"{Path(path).name}: missing (its process wrote no result)")
            continue
        except (OSError, ValueError) as e:
            notes.append(f"{Path(path).name}: unreadable ({type(e).__name__}: {e})")
            continue
        if not isinstance(res, dict) or res.get("kind") != "device":
            notes.append(f"{Path(path).name}: not a device result")
            continue
        parts.append(res)
    return parts, notes


def find_results_dir(start: Path | None = None) -> Path | None:
    """docs/results of this checkout: searched upward from `start` (cwd), then beside the installed package."""
    here = Path(start or Path.cwd()).resolve()
    for d in [here, *here.parents, Path(__file__).resolve().parents[2]]:
        if (d / "docs" / "results").is_dir():
            return d / "docs" / "results"
    return None


def load_device_results(folder: Path | None) -> list[dict]:
    """Every committed device result (JSON with kind == "device") in folder or below, newest first; [] if none."""
    if folder is None or not Path(folder).is_dir():
        return []
    out = []
    for p in sorted(Path(folder).rglob("*.json")):  # a folder per run is fine
        try:
            res = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(res, dict) and res.get("kind") == "device" and res.get("rows"):
            res["_path"] = str(p)
            out.append(res)
    return sorted(out, key=lambda r: r.get("machine", {}).get("date", ""), reverse=True)

