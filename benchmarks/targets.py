"""The project's speed targets for the layer benchmark, and their check.

They belong to the project, not to the installed package: the harness
(:mod:`pyro_lunet.cli.bench`, also run by ``pyro-lunet bench``) measures,
``bench_layers.py`` beside this file runs it and checks every target below.
Each target comes from an issue of the project's tracker.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyro_lunet.cli.bench import PEERS


@dataclass(frozen=True)
class Target:
    """A goal: ``time(row, task) <= max_ratio * time(versus, versus_task)`` at ``dim``.

    ``versus`` may be a row name or ``"fastest peer"`` (the fastest of the
    peers on ``versus_task``); ``versus_dim`` (default ``dim``) compares
    against another dimension's time, e.g. a row's own growth with D.
    """

    label: str
    row: str
    task: str
    dim: int
    versus: str
    versus_task: str
    max_ratio: float
    versus_dim: int | None = None


TARGETS: list[Target] = [
    Target("LU density step vs nflows step", "lu[role=density]", "density", 1024,
           "nflows", "density", 0.8),
    Target("LU guide step vs nflows step", "lu[role=guide]", "guide", 1024,
           "nflows", "density", 0.8),
    Target("LU no-grad sampling vs fastest peer", "lu[role=guide]", "sample", 1024,
           "fastest peer", "sample", 0.6),
    Target("LU no-grad scoring vs fastest peer", "lu[role=density]", "score", 1024,
           "fastest peer", "score", 0.6),
    Target("LU density step vs Pyro GeneralizedChannelPermute", "lu[role=density]",
           "density", 256, "pyro GeneralizedChannelPermute", "density", 0.01),
    Target("rank-one density step vs nflows step", "rank_one", "density", 1024,
           "nflows", "density", 0.6),
    Target("rank-one guide step vs nflows step", "rank_one", "guide", 1024,
           "nflows", "density", 0.6),
    Target("butterfly density step vs nflows step", "butterfly", "density", 1024,
           "nflows", "density", 0.2),
    Target("butterfly density step growth from D=1024", "butterfly",
           "density", 4096, "butterfly", "density", 6.0, versus_dim=1024),
    Target("circulant density step vs nflows step", "circulant", "density", 1024,
           "nflows", "density", 1 / 8),
    Target("circulant density step growth from D=1024", "circulant",
           "density", 4096, "circulant", "density", 6.0, versus_dim=1024),
]  # fmt: skip


def check_targets(results) -> list[tuple[Target, float | None, bool | None]]:
    outcomes = []
    for target in TARGETS:
        entry = results["dims"].get(target.dim)
        times = entry["times"] if entry else None
        if not times or target.row not in times[target.task]:
            outcomes.append((target, None, None))
            continue
        if target.versus == "fastest peer":
            peer_times = [v for k, v in times[target.versus_task].items() if k in PEERS]
            versus = min(peer_times) if peer_times else None
        else:
            versus = times[target.versus_task].get(target.versus)
        if target.versus_dim is not None:
            other = results["dims"].get(target.versus_dim)
            versus = other["times"][target.versus_task].get(target.versus) if other else None
        if versus is None:
            outcomes.append((target, None, None))
            continue
        ratio = times[target.task][target.row] / versus
        outcomes.append((target, ratio, ratio <= target.max_ratio))
    return outcomes


def report(results) -> dict:
    """Prints each target's outcome; returns them for the results' JSON (``"targets"``)."""
    print("\nTargets:")
    outcomes = check_targets(results)
    for target, ratio, ok in outcomes:
        mark = "n/a " if ok is None else ("met " if ok else "MISS")
        shown = "not measured" if ratio is None else f"{ratio:.3f}x"
        print(f"  [{mark}] {target.label} at D={target.dim}: {shown} (goal <= {target.max_ratio}x)")
    return {
        "targets": [
            {"label": t.label, "dim": t.dim, "ratio": r, "goal": t.max_ratio, "met": ok}
            for t, r, ok in outcomes
        ]
    }
