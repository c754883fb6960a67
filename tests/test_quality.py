"""The quality measures against plain loops in float64, on fresh random sets, and on sets whose answer
is known (a set against itself, sets far apart, copies)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from seedselect_cli import quality


def plain_radius(rows: np.ndarray, i: int, k: int) -> float:
    return sorted(math.dist(rows[i], rows[j]) for j in range(len(rows)) if j != i)[k - 1]


def plain_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    real_r = [plain_radius(real, i, k) for i in range(len(real))]
    fake_r = [plain_radius(fake, j, k) for j in range(len(fake))]
    precision = np.mean([any(math.dist(f, r) <= real_r[i] for i, r in enumerate(real)) for f in fake])
    recall = np.mean([any(math.dist(r, f) <= fake_r[j] for j, f in enumerate(fake)) for r in real])
    return float(precision), float(recall)


def plain_kid(real: np.ndarray, fake: np.ndarray) -> float:
    d = real.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1) ** 3

    m, n = len(real), len(fake)
    rr = sum(k(real[i], real[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    ff = sum(k(fake[i], fake[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    rf = sum(k(a, b) for a in real for b in fake) / (m * n)
    return rr + ff - 2 * rf


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_recall_density_coverage_and_kid_match_plain_loops(seed):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(23, 5))
    fake = rng.normal(loc=0.8, scale=0.7, size=(17, 5))
    p, r = quality.precision_recall(torch.from_numpy(real), torch.from_numpy(fake))
    assert (p, r) == pytest.approx(plain_precision_recall(real, fake, 3))
    radii = [plain_radius(real, i, 3) for i in range(len(real))]
    assert quality.on_manifold(torch.from_numpy(real), torch.from_numpy(fake)).tolist() == [
        any(math.dist(f, x) <= radii[i] for i, x in enumerate(real)) for f in fake]
    assert not (p in (0.0, 1.0) and r in (0.0, 1.0))  # a case where the answer is not trivially 0 or 1
    real_r = [plain_radius(real, i, 3) for i in range(len(real))]
    inside = [[math.dist(f, x) <= real_r[i] for f in fake] for i, x in enumerate(real)]
    density, coverage = quality.density_coverage(torch.from_numpy(real), torch.from_numpy(fake))
    assert density == pytest.approx(sum(map(sum, inside)) / (3 * len(fake)))
    assert coverage == pytest.approx(np.mean([any(row) for row in inside]))
    assert quality.kid(torch.from_numpy(real), torch.from_numpy(fake)) == pytest.approx(plain_kid(real, fake),
                                                                                         rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_precision_matches_a_plain_loop_without_each_images_own_original(seed):
    """Round trip i against the real rows with real row i taken out: its ball and its part in the radii."""
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(23, 5))
    trips = real + rng.normal(scale=0.6, size=real.shape)  # row i: real row i after a lossy passage
    hits = []
    for i, t in enumerate(trips):
        rest = np.delete(real, i, axis=0)
        hits.append(any(math.dist(t, rest[j]) <= plain_radius(rest, j, 3) for j in range(len(rest))))
    ours = quality.round_trip_precision(torch.from_numpy(real), torch.from_numpy(trips))
    assert ours == pytest.approx(np.mean(hits)) and 0 < ours < 1
    # the radii without the original matter: keeping real row i in them scores lower on these draws
    kept = [plain_radius(real, j, 3) for j in range(len(real))]
    with_original = np.mean([any(math.dist(t, real[j]) <= kept[j] for j in range(len(real)) if j != i)
                             for i, t in enumerate(trips)])
    assert with_original < ours
    outlier = torch.cat([torch.from_numpy(real), torch.full((1, 5), 50.0, dtype=torch.float64)])
    assert quality.precision_recall(outlier, outlier)[0] == 1.0  # each row is in its own ball
    assert quality.round_trip_precision(outlier, outlier) == pytest.approx(1 - 1 / 24, abs=0.05)  # not the outlier
    assert quality.round_trip_precision(outlier[:4], outlier[:4]) is None  # k + 1 rows: no ball without its own


def test_known_answers():
    rng = np.random.default_rng(5)
    real = torch.from_numpy(rng.normal(size=(30, 4)))
    assert quality.precision_recall(real, real.clone()) == (1.0, 1.0)
    assert quality.precision_recall(real, real + 100.0) == (0.0, 0.0)
    assert quality.precision_recall(real[:3], real) == (None, 1.0)  # 3 real rows: no k-NN ball with k = 3
    same = torch.from_numpy(rng.normal(size=(400, 4)))
    assert abs(quality.kid(real, same)) < 0.2 < quality.kid(real, same + 3.0)
    assert quality.diversity(real[:1]) is None and quality.diversity(torch.ones(3, 4)) == pytest.approx(0.0, abs=1e-6)


def test_copies_counts_images_that_reproduce_a_reference():
    rng = np.random.default_rng(7)

    def noise(n):
        return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]

    refs, real, fresh = noise(5), noise(64), noise(16)
    nudged = [Image.fromarray(np.clip(np.asarray(refs[0], dtype=np.int16) + 3, 0, 255).astype(np.uint8))]
    ref_px, real_px = quality.pixel_features(refs), quality.pixel_features(real)
    # Images drawn as the real ones are: at most 1 in 65 is nearer a reference than every real image.
    assert quality.copies(ref_px, quality.pixel_features(fresh), real_px) <= 1 / 16
    assert quality.copies(ref_px, quality.pixel_features(nudged + refs[1:2] + noise(2)), real_px) == 0.5
    # Without real images nothing says how near is too near: the references' own spacing calls a third or more of
    # images drawn as the real ones are copies (the rule `copies` once fell back to), so it is left out.
    between = torch.cdist(ref_px, ref_px) + torch.eye(len(ref_px)) * 1e9
    fresh_px = quality.pixel_features(noise(400))
    spacing_rule = float((torch.cdist(fresh_px, ref_px).min(dim=1).values < between.min()).float().mean())
    assert spacing_rule > 0.25  # 0.69 here
    assert quality.copies(ref_px, fresh_px, real_px) < 0.05
    assert quality.copies(ref_px, quality.pixel_features(nudged + noise(3))) is None
    assert quality.copies(ref_px, fresh_px, real_px[:0]) is None
    # Against n real images, 1 in n + 1 images drawn as they are lies nearer a reference than all of them: with 1,
    # half; below COPIES_MINIMUM (19: 5 %) it is left out.
    one_real = float((torch.cdist(fresh_px, ref_px).min(dim=1).values
                      < torch.cdist(real_px[:1], ref_px).min()).float().mean())
    assert one_real > 0.2  # 0.5 expected
    assert quality.copies(ref_px, fresh_px, real_px[:quality.COPIES_MINIMUM - 1]) is None
    assert quality.copies(ref_px, fresh_px, real_px[:quality.COPIES_MINIMUM]) is not None
