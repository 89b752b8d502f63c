"""Statistics declared once: the ``stats`` document, the Prometheus families and the ``top``
columns all come from the declarations in ``portside.statistics``. Pure: no sockets."""

from __future__ import annotations

import dataclasses
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from portside.control.target import LISTENER_FIGURES, TOTALLED, combine
from portside.metrics import exposition
from portside.statistics import (
    TTFB_BUCKETS,
    ListenerStatistics,
    WorkerStatistics,
    figure,
    figures,
    merge,
    metric_name,
)
from portside.top import fit, listener_columns, worker_columns


def listener(name: str, **values: Any) -> dict[str, Any]:
    """A listener entry as a worker reports it: every field, built by keyword."""
    fields: dict[str, Any] = {}
    for entry in dataclasses.fields(ListenerStatistics):
        if entry.name in ("name", "address", "policy"):
            fields[entry.name] = name if entry.name == "name" else "x"
        elif entry.name == "accept_state":
            fields[entry.name] = "accepting"
        elif entry.name == "accepting":
            fields[entry.name] = True
        elif entry.name == "closed_by_reason":
            fields[entry.name] = {"closed": 2}
        elif entry.name == "ttfb_buckets":
            fields[entry.name] = tuple(1 for _ in TTFB_BUCKETS)
        else:
            fields[entry.name] = 1
    fields.update(values)
    return dataclasses.asdict(ListenerStatistics(**fields))


def worker(slot: str, pid: int, listeners: list[dict[str, Any]]) -> dict[str, Any]:
    process: dict[str, Any] = {entry.name: 1 for entry in dataclasses.fields(WorkerStatistics)}
    process.update(slot=slot, pid=pid, state="running")
    return {"process": process, "engine": "epoll", "accepting_paused": False,
            "listeners": listeners,
            "pools": {"buffers": {"item_size": 4, "free": 1, "in_use": 1, "max_free": 8,
                                  "hits": 3, "misses": 0, "discarded": 0}}}


def test_workers_are_merged_by_each_figures_rule() -> None:
    document = combine([worker("0", 10, [listener("a", accepted=3)]),
                        worker("1", 11, [listener("a", accepted=4,
                                                  closed_by_reason={"reset": 1},
                                                  accept_state="paused")])], 1.0)
    (entry,) = document["listeners"]
    assert entry["accepted"] == 7  # a counter: summed
    assert entry["address"] == "x"  # a label: the same everywhere
    assert entry["accepting"] is True  # any worker accepting
    assert entry["accept_state"] == "accepting/paused"  # states: each one said
    assert entry["closed_by_reason"] == {"closed": 2, "reset": 1}
    assert entry["ttfb_buckets"] == [2] * len(TTFB_BUCKETS)
    assert document["totals"]["accepted"] == 7 and "name" not in document["totals"]
    assert document["pools"]["buffers"] == {"item_size": 4, "free": 2, "in_use": 2,
                                            "max_free": 8, "hits": 6, "misses": 0,
                                            "discarded": 0}
    assert [process["slot"] for process in document["workers"]] == ["0", "1"]


def test_every_numeric_figure_becomes_a_metric_family() -> None:
    document = combine([worker("0", 10, [listener("a")])], 1.0)
    document["draining"] = False
    families = {family.name: family for family in
                text_string_to_metric_families(exposition(document).decode())}
    helps: dict[str, str] = {}
    for name, declared in [*LISTENER_FIGURES, *figures(WorkerStatistics)]:
        if declared.kind in ("counter", "gauge") and declared.metric != "":
            family = metric_name(name, declared)
            assert family in families, family
            # Figures sharing a family (by a label) are described by the first of them.
            assert families[family].documentation == helps.setdefault(family, declared.help)
    assert "portside_closed" in families  # from closed_by_reason
    assert "portside_time_to_first_byte_seconds" in families


def test_a_field_added_without_a_declaration_still_appears() -> None:
    @dataclasses.dataclass(frozen=True)
    class Grown:
        name: str = dataclasses.field(metadata=figure("label", "Its name."))
        proxy_refused: int = dataclasses.field()
        note: str = dataclasses.field()

    declared = dict(figures(Grown))
    assert declared["proxy_refused"].kind == "counter"
    assert declared["note"].kind == "label"
    assert metric_name("proxy_refused", declared["proxy_refused"]) == "portside_proxy_refused"
    merged = merge(figures(Grown), [{"name": "a", "proxy_refused": 2, "note": "n"},
                                    {"name": "a", "proxy_refused": 3, "note": "n"}])
    assert merged == {"name": "a", "proxy_refused": 5, "note": "n"}


def test_totals_and_top_columns_come_from_the_declarations() -> None:
    assert "bytes_in" in TOTALLED and "ttfb_count" in TOTALLED
    headers = {column.header for column in listener_columns(1.0)}
    for _, declared in LISTENER_FIGURES:
        if declared.column is not None:
            assert declared.column in headers
    rows: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
        (listener("a-long-listener-name"), None)]
    for width in (30, 50, 80, 200):
        table = fit(listener_columns(1.0), rows, width)
        shown = [column.header for column in table.columns]
        assert "a-long-listener-name" in str(table.columns[0]._cells)  # the row's label stays
        assert sum(len(str(header)) for header in shown) <= width
    assert fit(worker_columns(1.0), [], 80).columns


def test_retired_workers_keep_their_counters_not_their_gauges() -> None:
    from portside.statistics import Retired

    retired = Retired()
    retired.add(worker("1", 10, [listener("a", accepted=5, active=3, pending=2,
                                          closed_by_reason={"reset": 4})]))
    retired.add(worker("1", 12, [listener("a", accepted=1, active=1)]))
    document = combine([worker("1", 11, [listener("a", accepted=2, active=1, pending=0)])],
                       1.0, retired=retired.document())
    (entry,) = document["listeners"]
    assert entry["accepted"] == 8  # the living's and every ended worker's
    assert entry["closed_by_reason"] == {"closed": 4, "reset": 4}
    assert entry["ttfb_buckets"] == [3] * len(TTFB_BUCKETS)
    assert entry["active"] == 1 and entry["pending"] == 0  # only the living's
    assert entry["accept_state"] == "accepting" and entry["accepting"] is True
    assert document["pools"]["buffers"]["hits"] == 9
    assert document["pools"]["buffers"]["free"] == 1
    assert document["totals"]["accepted"] == 8
    assert retired.total("accepted") == 6


def test_metric_names_carry_their_unit_and_counters_end_in_total() -> None:
    """The Prometheus naming guide: ``_bytes``/``_seconds`` where a figure has that unit,
    ``_total`` on counters; a renamed family keeps its former name as a marked alias."""
    document = combine([worker("1", 10, [listener("a", bytes_in=5, bytes_out=6)])], 1.0)
    families = {family.name: family for family in
                text_string_to_metric_families(exposition(document).decode())}
    assert families["portside_received_bytes"].samples[0].value == 5
    assert families["portside_sent_bytes"].samples[0].value == 6
    alias = families["portside_bytes_in"]
    assert alias.documentation.startswith("Deprecated: use portside_received_bytes")
    assert alias.samples[0].value == 5
    for cls in (ListenerStatistics, WorkerStatistics):
        for name, declared in figures(cls):
            family = metric_name(name, declared)
            if "bytes" in name:
                assert family.endswith("_bytes"), family
            if any(word in declared.help.lower() for word in ("seconds", "in seconds")) \
                    and declared.kind in ("gauge", "counter", "histogram"):
                assert family.endswith("_seconds"), family


def test_the_metrics_doc_lists_every_family_as_declared() -> None:
    from pathlib import Path

    from portside.metrics import families_table

    doc = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
    assert families_table() in doc.read_text(), "run: python -m portside.metrics"
