"""Draws a run's headline figures as one PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from bench.figures import SLOWLORIS_TARGET, Figure, figures_for, not_applicable
from bench.results import RunResult
from bench.servers import SERVERS, references, takes_part

PORTSIDE_COLOUR = "#d95f02"
OTHER_COLOUR = "#7570b3"
C_COLOUR = "#666666"


class ChartUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _panels(result: RunResult) -> list[Figure]:
    """The figures worth a panel, in scenario order: per server CPU-second where the server's
    own cost is the point (the machine is shared), RSS per connection for (d)."""
    wanted = {"a": ("req_cpu_s", "p99_us"), "b": ("req_cpu_s",), "c": ("conn_cpu_s",),
              "r": ("req_cpu_s",), "t64": ("req_cpu_s",), "t4k": ("req_cpu_s",),
              "hfull": ("conn_cpu_s",), "hresume": ("conn_cpu_s",), "rt": ("req_cpu_s",)}
    panels: list[Figure] = []
    for scenario in result.scenarios:
        if not any(takes_part(server, scenario) for server in result.servers):
            continue  # (r) without relays, say
        names = wanted.get(scenario, ("rss_per_conn_b",) if scenario.startswith("d")
                           else ("throughput_ratio",))
        panels += [f for f in figures_for(scenario) if f.name in names]
    return panels


def draw(result: RunResult, path: Path, title: str) -> None:
    """Horizontal bars per figure, one bar per server, at the median over the rounds, with a
    whisker from the lowest to the highest round; each bar is labelled with its value and its
    ratio to uvloop Protocol (the dashed line); the dotted red line in (e) is the target."""
    try:
        import matplotlib
    except ImportError:
        raise ChartUnavailable("matplotlib is not installed "
                               "(pip install -e '.[bench]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    thousands = FuncFormatter(lambda x, _: f"{x:,.0f}" if abs(x) >= 10 else f"{x:g}")

    panels = _panels(result)
    if not panels:
        raise ChartUnavailable("no figure to draw")
    columns = min(3, len(panels))
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5.6 * columns, 0.45 * len(result.servers)
                                                     * rows + 1.8 * rows + 0.8), squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(panels):
            ax.set_visible(False)
            continue
        figure = panels[index]
        servers = [s for s in result.servers if takes_part(s, figure.scenario)
                   and not not_applicable(s, figure)]  # no bar rather than a 0
        values = [result.median(s, figure) or 0.0 for s in servers]
        rounds = [result.values(s, figure) or [0.0] for s in servers]
        low = [value - min(each) for value, each in zip(values, rounds, strict=True)]
        high = [max(each) - value for value, each in zip(values, rounds, strict=True)]
        colours = [PORTSIDE_COLOUR if "portside" in s
                   else C_COLOUR if SERVERS[s].c_source else OTHER_COLOUR for s in servers]
        positions = list(range(len(servers)))
        ax.barh(positions, values, color=colours, xerr=[low, high],
                error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#222222"})
        ax.set_yticks(positions, servers, fontsize=8)
        ax.invert_yaxis()
        better = "higher" if figure.higher_is_better else "lower"
        ax.set_title(f"({figure.scenario}) {figure.label}, {better} is better", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.xaxis.set_major_formatter(thousands)
        ax.set_xlim(left=0)
        reference = result.median(references(figure.scenario)[0], figure)
        if reference and figure.scenario != "e":
            ax.axvline(reference, color="black", linestyle="--", linewidth=0.8)
        if figure.key == SLOWLORIS_TARGET.figure:
            ax.axvline(SLOWLORIS_TARGET.bound, color="red", linestyle=":", linewidth=1.0)
        for y, value, extra in zip(positions, values, high, strict=True):
            label = f" {value:,.{max(figure.decimals, 0)}f}"
            if reference and figure.scenario != "e":
                label += f"  ({value / reference:.2f}x)"
            ax.text(value + extra, y, label, va="center", fontsize=7)
        ax.margins(x=0.35)
    legend = [Patch(color=PORTSIDE_COLOUR, label="portside"),
              Patch(color=OTHER_COLOUR, label="asyncio / uvloop servers"),
              Patch(color=C_COLOUR, label="C epoll server (the limit)"),
              Line2D([], [], color="black", linestyle="--", linewidth=0.8,
                     label="uvloop Protocol, HAProxy in (r) (ratios are to it)"),
              Line2D([], [], color="#222222", marker="|", linestyle="-", linewidth=0.8,
                     label=f"lowest..highest of {result_rounds(result)} rounds")]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8,
               frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def result_rounds(result: RunResult) -> int:
    """How many rounds the figures are medians of."""
    return max((len(result.values(s, f)) for s in result.servers for f in _panels(result)),
               default=0)
