"""The shared data (digits, the user's ``.npz``) and its evaluation (:mod:`neurolattice.data`)."""

import numpy as np
import pytest
import torch

from neurolattice.data import baselines, load_digits, load_npz, wilson_interval

from .errors import one_line_error
from .npz import write_npz


def test_digits_split_is_stratified_75_25():
    data = load_digits()
    assert len(data.y_train) == 1347 and len(data.y_test) == 450
    assert data.x_train.shape[1:] == (8, 8, 1) and float(data.x_train.max()) == 1.0
    share = torch.bincount(data.y_test, minlength=10) / torch.bincount(data.y_train, minlength=10)
    assert ((share - 1 / 3).abs() < 0.03).all()


def test_wilson_interval():
    lo, hi = wilson_interval(441, 450)
    assert lo < 441 / 450 < hi and 0.95 < lo and hi < 0.995


def test_npz_kinds(tmp_path):
    rng = np.random.default_rng(0)
    images = load_npz(write_npz(tmp_path / "d.npz", x=rng.random((40, 5, 6)), y=np.arange(40) % 4))
    assert images.input_shape == (5, 6, 1) and images.task == "classification" and images.num_outputs == 4
    vectors = load_npz(write_npz(tmp_path / "d.npz", x=rng.random((40, 7)), y=rng.random((40, 2))))
    assert vectors.input_shape == (7,) and vectors.task == "regression" and vectors.num_outputs == 2


@pytest.mark.parametrize("arrays, words", [
    (dict(x=np.zeros((10, 3))), "no array(s) ['y']"),
    (dict(x=np.zeros((10, 3)), y=np.zeros(9, dtype=int)), "n = 10 rows"),
    (dict(x=np.zeros((10,)), y=np.zeros(10, dtype=int)), "x must be"),
    (dict(x=np.full((10, 3), np.nan), y=np.arange(10) % 2), "NaN or inf"),
    (dict(x=np.zeros((10, 3)), y=np.arange(10) - 1), "labels must be >= 0"),
    (dict(x=np.zeros((10, 3)), y=np.zeros(10, dtype=int)), "K >= 2"),
])
def test_npz_errors(tmp_path, arrays, words):
    with one_line_error() as excinfo:
        load_npz(write_npz(tmp_path / "d.npz", **arrays))
    assert words in str(excinfo.value)


def test_npz_missing_and_corrupt(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_npz(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="cannot read"):
        load_npz(bad)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read .* not a zip archive"):
        load_npz(junk)


def test_baselines_score_k_targets_with_the_pooled_r2(tmp_path):
    """Two float targets on features of scales 1 to 1e4: each baseline's figure is the R^2 the
    models report, pooled over the targets (scikit-learn's variance-weighted R^2), of the model
    fitted behind a scaler (recomputed here)."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 4)) * np.array([1.0, 10.0, 1e3, 1e4])
    y = x / x.std(0) @ rng.normal(size=(4, 2)) + 0.1 * rng.normal(size=(80, 2))
    data = load_npz(write_npz(tmp_path / "reg2.npz", x=x, y=y))
    figures = baselines(data)
    assert set(figures) == {"ridge", "mlp"}
    ridge = make_pipeline(StandardScaler(), Ridge()).fit(data.x_train.numpy(), data.y_train.numpy())
    expected = r2_score(data.y_test.numpy(), ridge.predict(data.x_test.numpy()), multioutput="variance_weighted")
    assert abs(figures["ridge"] - expected) <= 1e-5
    assert figures["mlp"] > 0.5
