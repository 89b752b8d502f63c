"""The results of a run and their summary: medians over rounds, ratios, targets met or missed."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.figures import Figure, Target, figures_for, not_applicable, targets_for
from bench.servers import (
    C_REFERENCE,
    HELD_TO_TARGETS,
    RELAY_HELD_TO_TARGETS,
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
    #: The ratio in each round it could be taken: its spread, and how many rounds met it.
    rounds: tuple[float, ...] = ()
    #: A smoke run (``--quick``): windows too short for a verdict, so it gives none.
    smoke: bool = False

    @property
    def rounds_met(self) -> int:
        return sum(1 for ratio in self.rounds if self.target.met(ratio))

    @property
    def verdict(self) -> str:
        if self.ratio is None:
            return "n/a"
        if self.smoke:
            return "smoke"
        return "PASS" if self.target.met(self.ratio) else "MISS"


@dataclass
class RunResult:
    servers: tuple[str, ...]
    scenarios: tuple[str, ...]
    rounds: int
    measurements: list[Measurement] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    smoke: bool = False  # a --quick run: its targets get no PASS/MISS
    orders: list[tuple[str, ...]] = field(default_factory=list)  # servers' order per round

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

    def round_ratios(self, server: str, figure: Figure, reference: str) -> list[float]:
        """The ratio to ``reference`` measured in the same round, for each round both ran."""
        ours = {m.round: m.figures.get(figure.name) for m in self._of(server, figure.scenario)}
        theirs = {m.round: m.figures.get(figure.name)
                  for m in self._of(reference, figure.scenario)}
        return [a / b for r, a in sorted(ours.items())
                if a is not None and (b := theirs.get(r)) is not None and b > 0]

    def cost_ratios(self, server: str, figure: Figure, own: Figure) -> list[float]:
        """The server's cost per unit in ``figure`` to its cost in ``own`` (both per
        CPU-second, so own / figure), for each round both were measured."""
        ours = {m.round: m.figures.get(figure.name) for m in self._of(server, figure.scenario)}
        base = {m.round: m.figures.get(own.name) for m in self._of(server, own.scenario)}
        return [b / a for r, a in sorted(ours.items())
                if a is not None and a > 0 and (b := base.get(r)) is not None]

    def ratio(self, server: str, figure: Figure, reference: str) -> float | None:
        """The median over rounds of the per-round ratio to ``reference`` in the same round."""
        ratios = self.round_ratios(server, figure, reference)
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
            held = self.portside_servers()
            if target.reference == RELAY_REFERENCE:  # a relay's target: portside's relay
                held = [RELAY_HELD_TO_TARGETS] if RELAY_HELD_TO_TARGETS in self.servers else []
            for server in held:
                if server != HELD_TO_TARGETS and HELD_TO_TARGETS in self.servers \
                        and target.reference != RELAY_REFERENCE:
                    continue  # the targets hold to the default engine when it ran
                if target.own is not None:
                    rounds = self.cost_ratios(server, figure, by_key[target.own])
                elif target.reference is None:
                    rounds = self.values(server, figure)
                else:
                    rounds = self.round_ratios(server, figure, target.reference)
                ratio = statistics.median(rounds) if rounds else None
                out.append(TargetResult(target, server, ratio, tuple(rounds), self.smoke))
        return out

    def to_json(self) -> dict[str, Any]:
        """Raw measurements, medians, ratios and targets, for the .json file."""
        medians: dict[str, dict[str, float]] = {}
        ratios: dict[str, dict[str, dict[str, float]]] = {ref: {} for ref in REFERENCES}
        for server in self.servers:
            medians[server] = {}
            for figure in self.figures():
                value = self.median(server, figure)
                if value is not None and not not_applicable(server, figure):
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
                         "server": t.server, "ratio": t.ratio, "verdict": t.verdict,
                         "rounds": list(t.rounds), "rounds_met": t.rounds_met}
                        for t in self.target_results()],
            "orders": [list(order) for order in self.orders],
            "measurements": [asdict(m) for m in self.measurements],
            "failures": [asdict(f) for f in self.failures],
        }
