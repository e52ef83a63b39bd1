"""The project's speed targets for the layer benchmark, and their check.

They belong to the project, not to the installed package: the harness
(:mod:`pyro_lunet.cli.bench`, also run by ``pyro-lunet bench``) measures,
``bench_layers.py`` beside this file runs it and checks every target below.
Each target comes from an issue of the project's tracker.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyro_lunet.cli.bench import BASE_ONLY, PEERS


@dataclass(frozen=True)
class Target:
    """A goal: ``time(row, task) <= max_ratio * time(versus, versus_task)`` at ``dim``.

    ``versus`` may be a row name, ``"fastest peer"`` (the fastest of the
    peers on ``versus_task``) or ``"one pass"`` (one elementwise pass over
    the batch: the goal is then a number of passes); ``versus_dim`` (default
    ``dim``) compares against another dimension's time, e.g. a row's own
    growth with D.
    """

    label: str
    row: str
    task: str
    dim: int
    versus: str
    versus_task: str
    max_ratio: float
    versus_dim: int | None = None


def _same_task(label, row, dim, versus, goal, tasks=("density", "guide"), versus_dim=None):
    return [
        Target(f"{label} {task} step", row, task, dim, versus, task, goal, versus_dim)
        for task in tasks
    ]


# Issue 15 (speed in both regimes), at D=1024, B=1024, each step against the
# same step of nflows' LULinear; the default LU layer is role="guide".
TARGETS: list[Target] = [
    *_same_task("LU role-matched (density role)", "lu[role=density]", 1024, "nflows", 0.7,
                tasks=("density",)),
    *_same_task("LU role-matched (guide role)", "lu[role=guide]", 1024, "nflows", 0.7,
                tasks=("guide",)),
    *_same_task("LU default", "lu[role=guide]", 1024, "nflows", 1.0),
    *_same_task("butterfly", "butterfly", 1024, "nflows", 0.1),
    *_same_task("butterfly passes,", "butterfly", 1024, "one pass", 40),
    *_same_task("circulant", "circulant", 1024, "nflows", 0.07),
    *_same_task("rank-one", "rank_one", 1024, "nflows", 0.4),
    *_same_task("butterfly growth D=1024 -> 4096,", "butterfly", 4096, "butterfly", 5.0,
                versus_dim=1024),
    *_same_task("circulant growth D=1024 -> 4096,", "circulant", 4096, "circulant", 5.0,
                versus_dim=1024),
    # Earlier issues' targets that issue 15 does not tighten.
    Target("LU no-grad sampling vs fastest peer", "lu[role=guide]", "sample", 1024,
           "fastest peer", "sample", 0.6),
    Target("LU no-grad scoring vs fastest peer", "lu[role=density]", "score", 1024,
           "fastest peer", "score", 0.6),
    Target("LU density step vs Pyro GeneralizedChannelPermute", "lu[role=density]",
           "density", 256, "pyro GeneralizedChannelPermute", "density", 0.01),
]  # fmt: skip


def check_targets(results) -> list[tuple[Target, float | None, bool | None]]:
    outcomes = []
    for target in TARGETS:
        entry = results["dims"].get(target.dim)
        times = entry["times"] if entry else None
        if not times or target.row not in times[target.task]:
            outcomes.append((target, None, None))
            continue
        if target.versus == "one pass":
            versus = entry.get("pass")
        elif target.versus == "fastest peer":
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
        unit = " passes" if target.versus == "one pass" else "x"
        shown = "not measured" if ratio is None else f"{ratio:.3f}{unit}"
        goal = f"goal <= {target.max_ratio}{unit}"
        print(f"  [{mark}] {target.label} at D={target.dim}: {shown} ({goal})")
    for dim, entry in results["dims"].items():  # the floor under every ratio above
        times = entry["times"]
        if BASE_ONLY in times["density"] and "nflows" in times["density"]:
            ratios = ", ".join(
                f"{task} {times[task][BASE_ONLY] / times[task]['nflows']:.3f}x"
                for task in ("density", "guide")
            )
            print(f"  floor at D={dim}: {BASE_ONLY} costs {ratios} of nflows' steps")
    return {
        "targets": [
            {"label": t.label, "dim": t.dim, "ratio": r, "goal": t.max_ratio, "met": ok}
            for t, r, ok in outcomes
        ]
    }
