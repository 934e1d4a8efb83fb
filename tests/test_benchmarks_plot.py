"""The loop-lag plot of ``benchmarks/scheduler.py`` keeps its legend off the data."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # its own imports: bench_jobs, report
    spec = importlib.util.spec_from_file_location("bench_scheduler", BENCHMARKS / "scheduler.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def series_like_a_run(names: list[str]) -> dict[str, list[float]]:
    """Lags as a run records them: near zero, a thread pool's GIL waits, a loop blocked 6 s."""
    series = {name: [0.0002, 0.004] * 175 for name in names}
    series[names[1]] = [6.0]
    series[names[2]] = [0.05, 0.002] * 150
    return series


def test_the_legend_is_outside_the_axes_and_inside_the_image(
    bench: ModuleType, tmp_path: Path
) -> None:
    series = series_like_a_run(list(bench.EXECUTORS))
    figure = bench.lag_figure(series)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    (axis,) = figure.axes
    (legend,) = figure.legends
    box = legend.get_window_extent(renderer)
    assert not box.overlaps(axis.get_window_extent(renderer))
    image = figure.bbox
    assert image.x0 <= box.x0 and box.x1 <= image.x1 and image.y0 <= box.y0 and box.y1 <= image.y1
    assert [text.get_text() for text in legend.get_texts()] == list(series)
    notes = [text.get_text() for text in axis.texts]
    assert notes == [f"{list(series)[1]}: loop blocked 6.0 s"]  # a lone point, labelled
    path = tmp_path / "loop-lag.png"
    bench.plot(series, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
