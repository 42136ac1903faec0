import numpy as np
import pytest

from splitcom.data import synthetic
from splitcom.data.partition import length_bins, partition
from splitcom.data.tokenize import Sample
from splitcom.errors import UserError


def _data(n=400, seed=0):
    ex = synthetic.generate(n, seed)
    rng = np.random.default_rng(seed)
    samples = [Sample(i, tuple(range(int(k))), tuple(range(int(k)))) for i, k in enumerate(rng.integers(10, 90, n))]
    return ex, samples


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "length_dirichlet"])
def test_sizes_cover_everything_once_and_are_deterministic(scheme):
    ex, samples = _data()
    parts = partition(ex, samples, 5, scheme, alpha=0.5, seed=3)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(samples)))
    assert all(parts)
    assert parts == partition(ex, samples, 5, scheme, alpha=0.5, seed=3)


def test_iid_sizes_are_balanced():
    ex, samples = _data(403)
    sizes = [len(p) for p in partition(ex, samples, 4, "iid")]
    assert max(sizes) - min(sizes) <= 1


def _length_skew(parts, samples, bins=4):
    b = np.array(length_bins([len(s.ids) for s in samples], bins))
    # mean over clients of the total-variation distance between client and global bin histograms
    glob = np.bincount(b, minlength=bins) / len(b)
    return np.mean([0.5 * np.abs(np.bincount(b[p], minlength=bins) / len(p) - glob).sum() for p in parts])


def test_length_dirichlet_small_alpha_skews_lengths():
    ex, samples = _data(800)
    iid = partition(ex, samples, 5, "iid", seed=1)
    skewed = partition(ex, samples, 5, "length_dirichlet", alpha=0.1, seed=1)
    mild = partition(ex, samples, 5, "length_dirichlet", alpha=100.0, seed=1)
    assert _length_skew(skewed, samples) > 0.3
    assert _length_skew(skewed, samples) > 3 * _length_skew(iid, samples)
    assert _length_skew(mild, samples) < _length_skew(skewed, samples)


def test_length_bins_are_quantiles():
    assert length_bins([1, 2, 3, 4, 5, 6, 7, 8], 4) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_too_many_clients_is_a_user_error():
    ex, samples = _data(10)
    with pytest.raises(UserError, match="federation.num_clients"):
        partition(ex, samples, 11, "iid")


def test_dirichlet_unknown_attribute():
    ex, samples = _data(50)
    with pytest.raises(UserError, match="data.partition.by"):
        partition(ex, samples, 2, "dirichlet", by="nope")
