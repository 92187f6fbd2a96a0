"""What the benchmark scripts share: their output, and the helpers they have in common.

Output:

- :func:`markdown_table` renders rows as a GitHub Markdown table;
- :func:`write_markdown` writes a results file (``benchmarks/results/*.md``);
- :func:`ratio_chart` draws a horizontal bar chart of ratios (one bar per
  measurement, the goal marked where there is one) with matplotlib, the
  ``bench`` extra. Without matplotlib it draws nothing and says why, so a
  benchmark still prints and writes its tables;
- :func:`write_results` is every script's epilogue: the chart, then the
  results file that names it (or says why there is none), then a log line.

Helpers: :func:`log` (stderr), :func:`cachefetch_revision`, :func:`machine`,
:func:`finite`, :func:`free_port`, and :func:`interrupt_on` with
:func:`run_main` for stopping cleanly on Ctrl-C and SIGTERM. The clients
(load generator, timed fetches) are in :mod:`loadgen`, the ``/proc``
readers in :mod:`procstat`.

It imports nothing from ``cachefetch`` or ``tests``.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, NoReturn, Sequence

__all__ = ["Bar", "markdown_table", "write_markdown", "ratio_chart", "met", "write_results", "log",
           "cachefetch_revision", "machine", "finite", "HOST", "free_port", "interrupt_on", "run_main"]

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
HOST = "127.0.0.1"  # every server the benchmarks start listens here, and nothing else is contacted


def met(ok: bool | None) -> str:
    """The "met" cell: ``yes``, ``**no**``, or ``—`` when there is no goal."""
    if ok is None:
        return "—"
    return "yes" if ok else "**no**"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """``header`` and ``rows`` as a Markdown table (``|`` in cells is escaped)."""
    out = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row has {len(row)} cells, header {len(header)}: {row!r}")
        out.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(out)


def write_markdown(path: str, text: str) -> None:
    """Write ``text`` to ``path`` (creating its directory), ending with one newline."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class Bar:
    """One bar: ``ratio`` (nan = not measured), and the ``goal`` it should reach.

    :param higher_is_better: whether the goal is a floor (``ratio >= goal``)
        or a ceiling (``ratio <= goal``).
    """

    label: str
    ratio: float
    goal: float | None = None
    higher_is_better: bool = True

    @property
    def ok(self) -> bool | None:
        if self.goal is None or math.isnan(self.ratio):
            return None
        return self.ratio >= self.goal if self.higher_is_better else self.ratio <= self.goal


def ratio_chart(path: str, bars: Sequence[Bar], title: str, xlabel: str = "ratio",
                subtitle: str | None = None) -> str | None:
    """Draw ``bars`` into the PNG ``path``.

    Bars are green where the goal is met, red where it is missed, grey where
    there is no goal; a goal is a black tick on its bar, 1.0 a dotted line.

    :returns: ``None`` on success, else why no chart was drawn (matplotlib missing).
    """
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (`pip install matplotlib`, or the `bench` extra)"
    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    shown = [b for b in bars if not math.isnan(b.ratio)]
    height = max(3.2, 1.2 + 0.45 * len(shown))  # a few bars still get room for their goal labels
    fig, ax = plt.subplots(figsize=(10, height))
    try:
        ys = list(range(len(shown)))[::-1]
        colors = ["#9e9e9e" if b.ok is None else ("#2e7d32" if b.ok else "#c62828") for b in shown]
        ax.barh(ys, [b.ratio for b in shown], color=colors, height=0.6)
        top = max([b.ratio for b in shown] + [b.goal or 0 for b in shown] + [1.0])
        for y, b in zip(ys, shown):
            ax.text(b.ratio + top * 0.01, y, f"{b.ratio:.2f}", va="center", fontsize=9)
            if b.goal is not None:
                ax.plot([b.goal, b.goal], [y - 0.38, y + 0.38], color="black", linewidth=2)
                sign = "≥" if b.higher_is_better else "≤"
                ax.text(b.goal, y + 0.42, f"goal {sign} {b.goal:g}", fontsize=7, ha="center")
        ax.axvline(1.0, color="black", linestyle=":", linewidth=1)
        ax.set_yticks(ys)
        ax.set_yticklabels([b.label for b in shown], fontsize=9)
        ax.set_xlim(0, top * 1.15)
        ax.set_ylim(-0.6, len(shown) - 0.1)  # headroom for the top bar's goal label
        ax.set_xlabel(xlabel)
        ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return None


def write_results(md_path: str, png_path: str, title: str, header: Sequence[str], body: str,
                  bars: Sequence[Bar], subtitle: str, subject: str = "cachefetch", echo: bool = False) -> None:
    """A run's epilogue: the chart ``png_path``, then ``md_path`` (``header`` lines, ``body``, the chart).

    The header gets a line naming the chart, or saying why it was skipped (a
    previous run's chart is then removed: it would not match these tables).
    ``echo`` prints the Markdown too. ``subject`` is what a higher ratio favours.
    """
    chart_note = ratio_chart(
        png_path, bars, title,
        xlabel=f"ratio (↑ = higher is better for {subject}, ↓ = lower is better); black tick = goal",
        subtitle=subtitle)
    header = list(header)
    if chart_note is None:
        header.append(f"- chart: `{os.path.relpath(png_path, REPO_ROOT)}`")
    else:
        header.append(f"- chart skipped: {chart_note}")
        if os.path.exists(png_path):  # an older run's chart would not match these tables
            os.unlink(png_path)
            log(f"removed the previous run's {os.path.relpath(png_path, REPO_ROOT)}")
    text = "\n".join(header) + "\n\n" + body + "\n"
    if chart_note is None:
        text += f"\n![ratios]({os.path.basename(png_path)})\n"
    if echo:
        print(text)
    write_markdown(md_path, text)
    log(f"written to {os.path.relpath(md_path, REPO_ROOT)}"
        + (f" and {os.path.relpath(png_path, REPO_ROOT)}" if chart_note is None
           else f"; chart skipped: {chart_note}"))


# -- helpers ----------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def cachefetch_revision() -> str:
    """The commit of the work tree being measured, and whether cachefetch/ differs from it."""
    try:
        head = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--", "cachefetch"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "an unknown revision (no git)"
    return f"commit {head}" + (" with uncommitted changes in cachefetch/" if dirty else "")


def machine(now: datetime.datetime) -> str:
    """When and on what: ``now``, the platform, the CPU count, the Python version."""
    return (f"{now:%Y-%m-%d %H:%M %Z}; {platform.platform()}; {os.cpu_count()} CPUs; "
            f"Python {platform.python_version()}")


def finite(x: float) -> float:
    """``x``, or nan (not drawn) when it is infinite."""
    return x if math.isfinite(x) else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def interrupt_on(*signums: int) -> None:
    """Turn these signals into KeyboardInterrupt, so ``finally`` blocks stop servers and remove temp files."""
    def terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in signums:
        signal.signal(signum, terminate)


def run_main(main: Callable[[], int]) -> NoReturn:
    """Exit with ``main()``'s code; on KeyboardInterrupt (Ctrl-C, :func:`interrupt_on`), with 130."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; servers stopped and temp files removed")
        sys.exit(130)
