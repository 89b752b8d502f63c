"""The figures each scenario yields and the targets set on them (both as data)."""

from __future__ import annotations

from dataclasses import dataclass

from bench.servers import C_REFERENCE, RELAY_REFERENCE, UVLOOP_REFERENCE


@dataclass(frozen=True)
class Figure:
    """One number a scenario measures, e.g. ``a.req_s``."""

    scenario: str
    name: str
    label: str
    #: digits after the point in tables
    decimals: int = 0
    higher_is_better: bool = True
    #: shown as a ratio to uvloop Protocol and to the C server
    compared: bool = True

    @property
    def key(self) -> str:
        return f"{self.scenario}.{self.name}"


def _load_figures(scenario: str, unit: str) -> tuple[Figure, ...]:
    """What a persistent (unit "req") or short-lived (unit "conn") scenario yields."""
    figures = [
        Figure(scenario, f"{unit}_s", f"{unit}/s"),
        Figure(scenario, f"{unit}_cpu_s", f"{unit}/CPU-s"),
        Figure(scenario, "p50_us", "p50 µs", higher_is_better=False),
        Figure(scenario, "p99_us", "p99 µs", higher_is_better=False),
    ]
    if scenario in ("b", "t4k"):
        figures.insert(1, Figure(scenario, "mb_s", "MB/s", decimals=1))
    if scenario in ("hfull", "hresume"):
        figures.append(Figure(scenario, "resumed_share", "resumed", decimals=2,
                              compared=False))
    figures += [
        Figure(scenario, "srv_cpu", "server CPU", decimals=2, compared=False),
        Figure(scenario, "lg_cpu", "loadgen CPU", decimals=2, compared=False),
        *([Figure(scenario, "upstream_cpu", "upstream CPU", decimals=2, compared=False)]
          if scenario in ("r", "rt") else []),
        Figure(scenario, "other_cpu", "other CPU", decimals=2, compared=False),
        Figure(scenario, "failures", "failures", higher_is_better=False, compared=False),
    ]
    return tuple(figures)


def idle_figures(scenario: str) -> tuple[Figure, ...]:
    return (
        Figure(scenario, "rss_per_conn_b", "RSS B/conn", higher_is_better=False),
        Figure(scenario, "held", "held by server", compared=False),
        Figure(scenario, "closed_by_server", "closed by server", higher_is_better=False,
               compared=False),
        Figure(scenario, "connect_s", "connect s", decimals=2, higher_is_better=False,
               compared=False),
    )


SLOWLORIS_FIGURES = (
    Figure("e", "base_req_s", "req/s no attack", compared=False),
    Figure("e", "attack_req_s", "req/s attacked", compared=False),
    Figure("e", "throughput_ratio", "attacked / no attack", decimals=2, compared=False),
    Figure("e", "base_p99_us", "p99 µs no attack", higher_is_better=False, compared=False),
    Figure("e", "attack_p99_us", "p99 µs attacked", higher_is_better=False, compared=False),
    Figure("e", "p99_ratio", "p99 attacked / no attack", decimals=2, higher_is_better=False,
           compared=False),
    Figure("e", "silent_connected", "silent connected", compared=False),
    Figure("e", "silent_closed", "silent closed by server", compared=False),
    Figure("e", "attack_srv_cpu", "server CPU attacked", decimals=2, compared=False),
    Figure("e", "attack_lg_cpu", "loadgen CPU attacked", decimals=2, compared=False),
    Figure("e", "attack_other_cpu", "other CPU attacked", decimals=2, compared=False),
    Figure("e", "failures", "failures", higher_is_better=False, compared=False),
)


def not_applicable(server: str, figure: Figure) -> bool:
    """A figure that means nothing for this server (reported as n/a, drawn as no bar, never
    shown as 0): the C server keeps no per-connection state in user space."""
    return server == C_REFERENCE and figure.name == "rss_per_conn_b"


def figures_for(scenario: str) -> tuple[Figure, ...]:
    if scenario == "a":
        return _load_figures("a", "req")
    if scenario == "b":
        return _load_figures("b", "req")
    if scenario == "c":
        return _load_figures("c", "conn")
    if scenario.startswith("d"):
        return idle_figures(scenario)
    if scenario == "e":
        return SLOWLORIS_FIGURES
    if scenario in ("r", "t64", "t4k", "rt"):
        return _load_figures(scenario, "req")
    if scenario in ("hfull", "hresume"):
        return _load_figures(scenario, "conn")
    raise KeyError(scenario)


@dataclass(frozen=True)
class Target:
    """A ratio a portside server must reach: against a reference server, or its own figure."""

    figure: str  # a figure key
    bound: float
    at_least: bool  # True: ratio >= bound; False: ratio <= bound
    #: the server the ratio is taken against; None: the figure is already a ratio, or ...
    reference: str | None = UVLOOP_REFERENCE
    #: ... a figure key of the same server (per CPU-second): the ratio is then the cost of one
    #: unit in ``figure`` to its cost in ``own`` (own / figure), round by round
    own: str | None = None

    @property
    def scenario(self) -> str:
        return self.figure.split(".", 1)[0]

    def requirement(self) -> str:
        sign = ">=" if self.at_least else "<="
        if self.own:
            return f"cost per request {sign} {self.bound:g}x its own {self.own}"
        against = f"{self.reference}" if self.reference else "own no-attack figure"
        return f"{sign} {self.bound:g}x {against}"

    def met(self, ratio: float) -> bool:
        return ratio >= self.bound if self.at_least else ratio <= self.bound


SLOWLORIS_TARGET = Target("e.throughput_ratio", 0.95, True, reference=None)


def targets_for(scenarios: tuple[str, ...]) -> tuple[Target, ...]:
    """The compiled engine's targets (issue 11) for the scenarios of this run, per server
    CPU-second: the C server is the limit here, uvloop the peer to beat."""
    out: list[Target] = []
    for scenario in scenarios:
        if scenario == "a":
            out += [Target("a.req_cpu_s", 0.95, True, reference=C_REFERENCE),
                    Target("a.req_cpu_s", 1.1, True)]
        elif scenario == "b":
            out.append(Target("b.req_cpu_s", 0.9, True, reference=C_REFERENCE))
        elif scenario == "c":
            out += [Target("c.conn_cpu_s", 0.9, True, reference=C_REFERENCE),
                    Target("c.conn_cpu_s", 1.2, True)]
        elif scenario.startswith("d"):
            out.append(Target(f"{scenario}.rss_per_conn_b", 0.25, False))
        elif scenario == "e":
            out.append(SLOWLORIS_TARGET)
        # issue 20: TLS, per server (relay) CPU-second
        elif scenario == "t64":
            out.append(Target("t64.req_cpu_s", 1.25, True))
            if "a" in scenarios:  # TLS costs at most twice plain, per request
                out.append(Target("t64.req_cpu_s", 2.0, False, reference=None,
                                  own="a.req_cpu_s"))
        elif scenario == "hfull":
            out.append(Target("hfull.conn_cpu_s", 1.0, True))
        elif scenario == "hresume":
            out.append(Target("hresume.conn_cpu_s", 1.2, True))
        elif scenario == "rt":
            out.append(Target("rt.req_cpu_s", 0.8, True, reference=RELAY_REFERENCE))
    return tuple(out)
