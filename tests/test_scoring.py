"""The measures of a set of images against plain loops over fresh random inputs."""

from __future__ import annotations

import random

import pytest
import torch

from seedselect_cli.scoring import mean_pairwise_distance, overall, topk_correct


def test_topk_and_diversity_match_plain_loops():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    # distinct logits, and logits with many equal (classes whose prompts CLIP reads as the same text)
    for logits in (torch.randn(50, 7, generator=g), torch.randint(0, 3, (50, 7), generator=g).float()):
        labels = torch.randint(0, 7, (50,), generator=g)
        right = {}
        for k in (1, 3, 5, 9):  # a plain loop: classes by logit, equal ones by index (`sorted` is stable)
            expected = [labels[i].item() in sorted(range(7), key=lambda c: -logits[i, c].item())[:k] for i in range(50)]
            right[k] = topk_correct(logits, labels, k)
            assert right[k].tolist() == expected
        assert right[1].tolist() == (logits.argmax(dim=1) == labels).tolist()  # the report's per-image top-1
        assert all((right[a] <= right[b]).all() for a, b in ((1, 3), (3, 5), (5, 9)))
    embeds = torch.nn.functional.normalize(torch.randn(6, 16, generator=g, dtype=torch.float64), dim=-1)
    pairs = [1 - float(embeds[i] @ embeds[j]) for i in range(6) for j in range(i + 1, 6)]
    assert mean_pairwise_distance(embeds) == pytest.approx(sum(pairs) / len(pairs))
    assert mean_pairwise_distance(embeds[:1]) is None


def test_overall_is_the_image_weighted_mean_over_the_classes_that_have_a_value():
    rng = random.Random(7)
    per_class = {}
    for c in range(6):
        per_class[f"class {c}"] = {"n_images": rng.randint(1, 20), "fidelity": rng.random(),
                                   "diversity": rng.random() if c % 3 else None, "kid": None}
    got = overall(per_class)
    rows = list(per_class.values())
    assert got["n_images"] == sum(r["n_images"] for r in rows)
    for key in ("fidelity", "diversity"):
        have = [r for r in rows if r[key] is not None]
        total = 0.0
        for r in have:
            total += r[key] * r["n_images"]
        assert got[key] == pytest.approx(total / sum(r["n_images"] for r in have))
    assert got["kid"] is None
