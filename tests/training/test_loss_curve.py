"""The loss-curve PNG (training/monitor.py): matplotlib figure with real ticks, stage starts, raw and
smoothed loss, log scale over a wide range; where it is written by default.

The figures are checked through matplotlib's own objects (axes scale, lines, tick labels) and the
PNG through PIL: what a reader of the picture sees, not how it was computed.
"""
import math
import random

import pytest
from PIL import Image

from megatron_vita.training.config import TrainConfig
from megatron_vita.training.monitor import default_loss_curve, ema, loss_curve_figure, plot_loss_curve


def _demo_like():
    """Stage 1 (30 iterations) then stage 2 (400, its count restarted and drawn after stage 1)."""
    rng = random.Random(0)
    s1 = [(i, 6.2 - 1.5 * (1 - math.exp(-i / 10)) + rng.gauss(0, 0.1)) for i in range(1, 31)]
    s2 = [(30 + i, 0.25 + 3.8 * math.exp(-i / 80) + abs(rng.gauss(0, 0.1))) for i in range(1, 401)]
    return s1 + s2


def test_default_loss_curve_path():
    assert default_loss_curve(TrainConfig(loss_curve="x/curve.png", save="ckpt")) == "x/curve.png"
    assert default_loss_curve(TrainConfig(save="ckpt")) == "ckpt/loss_curve.png"
    assert default_loss_curve(TrainConfig()) is None


def test_ema_is_debiased_and_follows_a_step():
    assert ema([2.0, 2.0, 2.0], span=9) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0 at the start
    out = ema([0.0] * 5 + [1.0] * 200, span=9)
    assert out[4] == 0.0 and 0.0 < out[5] < 0.5 and out[-1] == pytest.approx(1.0)


def test_two_stages_marked_smoothed_separately_on_a_log_axis():
    points = _demo_like()
    fig = loss_curve_figure(points, "demo", stages=[(1, "stage 1"), (31, "stage 2")])
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"  # 6.2 down to ~0.3: more than a decade
    raw = [line for line in ax.get_lines() if line.get_label() == "loss"]
    assert len(raw) == 1 and list(raw[0].get_xdata()) == [x for x, _ in points]
    smooth = [line for line in ax.get_lines() if line.get_linewidth() == 2]
    # Only stage 2 is long enough for its average; it starts at stage 2's first point, not before.
    assert len(smooth) == 1 and smooth[0].get_xdata()[0] == 31 and smooth[0].get_xdata()[-1] == 430
    boundaries = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(boundaries) == 1 and list(boundaries[0].get_xdata()) == [30.5, 30.5]
    assert [t.get_text().strip() for t in ax.texts] == ["stage 1", "stage 2"]
    fig.canvas.draw()
    xticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert len(xticks) >= 4 and all(float(t).is_integer() for t in xticks)
    labels = {t.get_text() for t in ax.yaxis.get_ticklabels(which="both") if t.get_text()}
    assert "1" in labels and not any("10^" in s or "e-" in s for s in labels), labels


def test_narrow_range_is_linear_and_non_finite_losses_are_left_out():
    points = [(i, 2.0 + 0.01 * math.sin(i)) for i in range(1, 101)] + [(101, float("nan")), (102, float("inf"))]
    fig = loss_curve_figure(points, "narrow")
    ax = fig.axes[0]
    assert ax.get_yscale() == "linear"
    assert not [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    raw = next(line for line in ax.get_lines() if line.get_label() == "loss")
    assert list(raw.get_xdata()) == list(range(1, 101))


def test_png_written_headless(tmp_path, monkeypatch):
    # An interactive backend requested by the environment must not matter: the figure has its own canvas.
    monkeypatch.setenv("MPLBACKEND", "TkAgg")
    path = tmp_path / "sub" / "curve.png"
    plot_loss_curve(_demo_like(), str(path), title="demo", stages=[(1, "stage 1"), (31, "stage 2")])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (900, 480)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 50  # lines, text, grid: not a blank canvas
    plot_loss_curve([(7, 1.5)], str(tmp_path / "one.png"))  # one point, and none, still give a picture
    plot_loss_curve([], str(tmp_path / "none.png"))
    assert (tmp_path / "one.png").stat().st_size > 0 and (tmp_path / "none.png").stat().st_size > 0
