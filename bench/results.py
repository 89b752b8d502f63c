"""The results of a run and their summary: medians over rounds, ratios, targets met or missed."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.figures import Figure, Target, figures_for, targets_for
from bench.servers import (
    C_REFERENCE,
    HELD_TO_TARGETS,
    RELAY_REFERENCE,
    SERVERS,
    UVLOOP_REFERENCE,
    references,
)

REFERENCES = (UVLOOP_REFERENCE, C_REFERENCE, RELAY_REFERENCE)


@dataclass(frozen=True)
class Measurement:
    """The figures of one scenario on one server in one round."""

    server: str
    scenario: str
    round: int
    figures: dict[str, float]


@dataclass(frozen=True)
class Failure:
    """A scenario that could not be measured, and why."""

    server: str
    scenario: str
    round: int
    reason: str


@dataclass(frozen=True)
class TargetResult:
    target: Target
    server: str
    ratio: float | None  # None: not measured (a server or the reference missing)

    @property
    def verdict(self) -> str:
        if self.ratio is None:
            return "n/a"
        return "PASS" if self.target.met(self.ratio) else "MISS"


@dataclass
class RunResult:
    servers: tuple[str, ...]
    scenarios: tuple[str, ...]
    rounds: int
    measurements: list[Measurement] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    # -- lookups ------------------------------------------------------------------------------

    def values(self, server: str, figure: Figure) -> list[float]:
        """The figure's value in each round it was measured, in round order."""
        return [m.figures[figure.name] for m in self._of(server, figure.scenario)
                if figure.name in m.figures]

    def _of(self, server: str, scenario: str) -> list[Measurement]:
        return sorted((m for m in self.measurements
                       if m.server == server and m.scenario == scenario), key=lambda m: m.round)

    def median(self, server: str, figure: Figure) -> float | None:
        values = self.values(server, figure)
        return statistics.median(values) if values else None

    def ratio(self, server: str, figure: Figure, reference: str) -> float | None:
        """The median over rounds of the per-round ratio to ``reference`` in the same round."""
        ours = {m.round: m.figures.get(figure.name) for m in self._of(server, figure.scenario)}
        theirs = {m.round: m.figures.get(figure.name)
                  for m in self._of(reference, figure.scenario)}
        ratios = [a / b for r, a in ours.items()
                  if a is not None and (b := theirs.get(r)) is not None and b > 0]
        return statistics.median(ratios) if ratios else None

    # -- summaries -----------------------------------------------------------------------------

    def figures(self) -> list[Figure]:
        return [f for scenario in self.scenarios for f in figures_for(scenario)]

    def portside_servers(self) -> list[str]:
        return [s for s in self.servers if SERVERS[s].is_portside]

    def target_results(self) -> list[TargetResult]:
        by_key = {f.key: f for f in self.figures()}
        out: list[TargetResult] = []
        for target in targets_for(self.scenarios):
            figure = by_key[target.figure]
            for server in self.portside_servers():
                if server != HELD_TO_TARGETS and HELD_TO_TARGETS in self.servers:
                    continue  # the targets hold to the default engine when it ran
                if target.reference is None:
                    ratio = self.median(server, figure)
                else:
                    ratio = self.ratio(server, figure, target.reference)
                out.append(TargetResult(target, server, ratio))
        return out

    def to_json(self) -> dict[str, Any]:
        """Raw measurements, medians, ratios and targets, for the .json file."""
        medians: dict[str, dict[str, float]] = {}
        ratios: dict[str, dict[str, dict[str, float]]] = {ref: {} for ref in REFERENCES}
        for server in self.servers:
            medians[server] = {}
            for figure in self.figures():
                value = self.median(server, figure)
                if value is not None:
                    medians[server][figure.key] = value
                if not figure.compared:
                    continue
                for ref in references(figure.scenario):
                    ratio = self.ratio(server, figure, ref)
                    if ratio is not None:
                        ratios[ref].setdefault(server, {})[figure.key] = ratio
        return {
            "medians": medians,
            "ratios": ratios,
            "targets": [{"figure": t.target.figure, "requirement": t.target.requirement(),
                         "server": t.server, "ratio": t.ratio, "verdict": t.verdict}
                        for t in self.target_results()],
            "measurements": [asdict(m) for m in self.measurements],
            "failures": [asdict(f) for f in self.failures],
        }
