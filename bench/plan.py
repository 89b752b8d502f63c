"""What one benchmark run does: servers, scenarios, durations and sizes, from the command line."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from bench.servers import DEFAULT_SERVERS, QUICK_SERVERS, SERVERS

#: Scenario letters as the command line takes them; "d" expands to one scenario per idle count,
#: "t" to its two message sizes (t64, t4k), "h" to full and resumed handshakes (hfull, hresume).
SCENARIO_LETTERS = ("a", "b", "c", "d", "e", "r", "t", "h", "rt")
EXPANDS = {"t": ("t64", "t4k"), "h": ("hfull", "hresume")}
FULL_IDLE_COUNTS = (1_000, 10_000)
QUICK_IDLE_COUNTS = (1_000,)


@dataclass(frozen=True)
class Plan:
    servers: tuple[str, ...]
    scenarios: tuple[str, ...]  # expanded: a, b, c, d1000, d10000, e
    rounds: int
    seconds: float  # measured window of each a/b/c run and of each half of e
    warmup: float  # unmeasured connection churn before each server is measured
    quick: bool
    clients: int = 50
    small_size: int = 64
    large_size: int = 4096
    slowloris_conns: int = 2_000
    defer_accept: int = 1
    connect_timeout: float = 20.0
    settle: float = 0.3  # pause before reading a server's RSS, so it has finished allocating
    server_cpu: int | None = 1
    loadgen_cpu: int | None = 0
    source_addresses: int = 250  # client source addresses 127.0.0.2 .. 127.0.0.251
    #: Seeds the order servers run in, shuffled anew every round (recorded: a run can be
    #: repeated in the same order).
    seed: int = 0
    #: (e)'s first-data timeout on the data-first port: shorter than the attack, so the
    #: defence (closing silent connections) works while it is measured.
    first_data_timeout: float = 1.0

    def server_orders(self) -> list[tuple[str, ...]]:
        """The servers' order in each round: a seeded shuffle per round, so no server always
        runs first (cold machine) or last (warm, or throttled)."""
        rng = random.Random(self.seed)
        orders = []
        for _ in range(self.rounds):
            order = list(self.servers)
            rng.shuffle(order)
            orders.append(tuple(order))
        return orders

    def attack_settle(self) -> float:
        """How long (e) holds the silent connections before it measures: the kernel's
        TCP_DEFER_ACCEPT hold plus the first-data timeout plus a margin, so the measured
        window sees the server closing them (and the attacker reopening them)."""
        return self.defer_accept + self.first_data_timeout + max(self.settle, 0.5)

    def idle_counts(self) -> tuple[int, ...]:
        return tuple(int(s[1:]) for s in self.scenarios if s.startswith("d"))

    def describe(self, scenario: str) -> str:
        """One line saying what a scenario does, for the report."""
        if scenario in ("t64", "t4k"):
            size = self.small_size if scenario == "t64" else self.large_size
            return (f"TLS persistent, {self.clients} clients, {size} B messages "
                    "(TLS servers only)")
        if scenario == "hfull":
            return (f"TLS handshakes: connect, full handshake, send {self.small_size} B, read "
                    f"echo, close; {self.clients} slots, no session offered (TLS servers only)")
        if scenario == "hresume":
            return ("TLS handshakes as hfull, each connection resuming the session (TLS 1.3 "
                    "ticket) its slot last received (TLS servers only)")
        if scenario == "rt":
            return (f"TLS relay: persistent, {self.clients} clients, {self.small_size} B "
                    "messages, TLS to the relay, plain from it to the C echo server "
                    "(relays only)")
        if scenario == "a":
            return f"persistent, {self.clients} clients, {self.small_size} B messages"
        if scenario == "b":
            return f"persistent, {self.clients} clients, {self.large_size} B messages"
        if scenario == "c":
            return (f"short-lived: connect, send {self.small_size} B, read echo, close; "
                    f"{self.clients} slots, sources over {self.source_addresses} 127.0.0.x")
        if scenario.startswith("d"):
            return f"{int(scenario[1:]):,} idle connections: server RSS per connection"
        if scenario == "e":
            return (f"slowloris: {self.slowloris_conns:,} silent connections on the data-first "
                    f"port (defer_accept={self.defer_accept} s, first_data_timeout="
                    f"{self.first_data_timeout:g} s) while {self.clients} clients "
                    f"echo {self.small_size} B on the immediate port (portside only)")
        if scenario == "r":
            return (f"relay: persistent, {self.clients} clients, {self.small_size} B messages "
                    "through the relay to the C echo server (relays only)")
        raise KeyError(scenario)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def expand_scenarios(letters: tuple[str, ...], idle_counts: tuple[int, ...]) -> tuple[str, ...]:
    unknown = [s for s in letters if s not in SCENARIO_LETTERS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)} "
                         f"(choose from {', '.join(SCENARIO_LETTERS)})")
    out: list[str] = []
    for letter in SCENARIO_LETTERS:
        if letter not in letters:
            continue
        if letter == "d":
            out.extend(f"d{n}" for n in dict.fromkeys(idle_counts))
        elif letter in EXPANDS:
            out.extend(EXPANDS[letter])
        else:
            out.append(letter)
    return tuple(out)


def letter_of(scenario: str) -> str:
    """The command-line letter a scenario came from: d1000 -> d, t64 -> t, rt -> rt."""
    if scenario in SCENARIO_LETTERS:
        return scenario
    return next((letter for letter, names in EXPANDS.items() if scenario in names),
                scenario[0])


def check_servers(names: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        raise ValueError(f"unknown server(s) {', '.join(unknown)} "
                         f"(choose from {', '.join(SERVERS)})")
    return tuple(dict.fromkeys(names))  # de-duplicated, in the order given


def default_servers(quick: bool) -> tuple[str, ...]:
    return QUICK_SERVERS if quick else DEFAULT_SERVERS
