"""Calibration: the expected calibration error, the reliability bins, and the temperature
fitted on validation, on logits whose right temperature is known."""
import numpy as np
import pytest

from ferpipe import plots
from ferpipe.evaluation import calibration
from ferpipe.model import infer

from conftest import save_tiny_cnn, tiny_runtime


def overconfident(n=20000, views=2, scale=3.0, seed=0):
    """Labels drawn from softmax(z) and logits scale * z: the temperature that undoes it is
    `scale`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, 1, 7)).repeat(views, 1)
    p = np.exp(z[:, 0]) / np.exp(z[:, 0]).sum(1, keepdims=True)
    y = (p.cumsum(1) < rng.random((n, 1))).sum(1)
    return scale * z, y


def test_the_fitted_temperature_undoes_overconfidence():
    logits, y = overconfident()
    t = calibration.fit_temperature(logits, y)
    assert t == pytest.approx(3.0, rel=0.05)
    before, after = calibration.tempered(logits, 1.0), calibration.tempered(logits, t)
    assert calibration.ece(after, y) < 0.02 < calibration.ece(before, y)
    assert calibration.nll(logits, y, t) < calibration.nll(logits, y, 1.0)
    assert (after.argmax(1) == before.argmax(1)).all()  # one view's label never changes


def test_ece_and_the_reliability_bins():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([0, 0, 0, 1])
    rows = calibration.reliability(probs, y, bins=10)
    assert [r["count"] for r in rows] == [0] * 6 + [2, 0, 0, 2]
    assert rows[9]["accuracy"] == 1.0 and rows[6]["accuracy"] == 0.5
    # (2 * |1 - 0.9| + 2 * |0.5 - 0.6|) / 4
    assert calibration.ece(probs, y, bins=10) == pytest.approx(0.1)
    assert calibration.ece(np.array([[1.0, 0.0]]), np.array([0])) == 0  # top bin holds 1.0


def test_calibrate_matches_predict_and_draws_the_diagram(tmp_path):
    model, _ = save_tiny_cnn(tmp_path / "cnn.pt")
    rng = np.random.default_rng(0)
    splits = {f"{s}_x": rng.integers(0, 256, (40, 48, 48), dtype=np.uint8) for s in ("val", "test")}
    splits.update({f"{s}_y": rng.integers(0, 7, 40) for s in ("val", "test")})
    rt = tiny_runtime(precision="fp32")
    summary, fig = calibration.calibrate(model, 40, splits, "flip", rt)
    assert set(summary) == {"temperature", "tta", "fitted_on", "bins", "val", "test"}
    assert summary["val"]["nll_calibrated"] <= summary["val"]["nll"] + 1e-9
    logits = infer.view_logits(model, splits["val_x"], 40, "flip", rt)
    assert logits.shape == (40, 2, 7)
    # The tempered mean of the views is what predict gives with that temperature.
    t = summary["temperature"]
    assert np.abs(calibration.tempered(logits, t)
                  - infer.predict(model, splits["val_x"], 40, "flip", rt, t)).max() < 1e-5
    assert len(fig.axes) == 2
    plots.plt.close(fig)
