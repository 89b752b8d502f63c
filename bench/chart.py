"""Draws a run's headline figures as one PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from bench.figures import SLOWLORIS_TARGET, Figure, figures_for
from bench.results import RunResult
from bench.servers import SERVERS, UVLOOP_REFERENCE

PORTSIDE_COLOUR = "#d95f02"
OTHER_COLOUR = "#7570b3"
C_COLOUR = "#666666"


class ChartUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _panels(result: RunResult) -> list[Figure]:
    """The figures worth a panel, in scenario order."""
    wanted = {"a": ("req_s", "req_cpu_s", "p99_us"), "b": ("req_s",), "c": ("conn_s",)}
    panels: list[Figure] = []
    for scenario in result.scenarios:
        names = wanted.get(scenario, ("rss_per_conn_b",) if scenario.startswith("d")
                           else ("throughput_ratio",))
        panels += [f for f in figures_for(scenario) if f.name in names]
    return panels


def draw(result: RunResult, path: Path, title: str) -> None:
    """Horizontal bars per figure, one bar per server; the dashed line is uvloop Protocol, the
    dotted red one in (e) the target."""
    try:
        import matplotlib
    except ImportError:
        raise ChartUnavailable("matplotlib is not installed "
                               "(pip install -e '.[bench]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    thousands = FuncFormatter(lambda x, _: f"{x:,.0f}" if abs(x) >= 10 else f"{x:g}")

    panels = _panels(result)
    if not panels:
        raise ChartUnavailable("no figure to draw")
    columns = min(3, len(panels))
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 0.45 * len(result.servers)
                                                     * rows + 1.6 * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(panels):
            ax.set_visible(False)
            continue
        figure = panels[index]
        servers = [s for s in result.servers
                   if figure.scenario != "e" or SERVERS[s].is_portside]
        values = [result.median(s, figure) or 0.0 for s in servers]
        colours = [PORTSIDE_COLOUR if SERVERS[s].is_portside
                   else C_COLOUR if SERVERS[s].c_source else OTHER_COLOUR for s in servers]
        positions = list(range(len(servers)))
        ax.barh(positions, values, color=colours)
        ax.set_yticks(positions, servers, fontsize=8)
        ax.invert_yaxis()
        better = "higher" if figure.higher_is_better else "lower"
        ax.set_title(f"({figure.scenario}) {figure.label}, {better} is better", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.xaxis.set_major_formatter(thousands)
        reference = result.median(UVLOOP_REFERENCE, figure)
        if reference and figure.scenario != "e":
            ax.axvline(reference, color="black", linestyle="--", linewidth=0.8)
        if figure.key == SLOWLORIS_TARGET.figure:
            ax.axvline(SLOWLORIS_TARGET.bound, color="red", linestyle=":", linewidth=1.0)
        for y, value in zip(positions, values, strict=True):
            ax.text(value, y, f" {value:,.{max(figure.decimals, 0)}f}", va="center",
                    fontsize=7)
        ax.margins(x=0.25)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
