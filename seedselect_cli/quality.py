"""Does a set of generated images look like real images of its class, and vary as they do?

Measures on embeddings (rows of features, one per image), each a small pure function:

    precision, recall    k-NN manifolds (Kynkaenniemi et al. 2019, "Improved precision and recall", eq. 1-3):
                         precision = share of generated images inside some real image's k-NN ball,
                         recall = share of real images inside some generated image's k-NN ball
    density, coverage    (Naeem et al. 2020, "Reliable fidelity and diversity metrics", eq. 3-4)
    kid                  Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 with the
                         kernel (x.y / d + 1)^3, on whatever features are given
    diversity            mean pairwise cosine distance; diversity_ratio, the images' over the references'
                         (in CLIP's space, like evaluate's `diversity`: in a judge's space, which is
                         trained to ignore where and how large a shape is, an off-model image counts
                         as variety)
    copies               share of images nearer some reference than any held-out real image of the class
                         is, in pixels (`pixel_features`): copying a reference is not generating. Measured
                         against real images only: the rule "nearer than any two references are to each
                         other" counts 0.38 of the toy world's fresh real images as copies (5 references: a
                         fresh image's 5 distances against the references' 10), and called the demo's
                         off-model cross a copy of a disc; with fewer than COPIES_MINIMUM held-out images it
                         is left out (None): against n real images a generator as good as the data counts 1 in
                         n + 1 (against the toy world's 64 about 1 in 65, against 1 every other image). A
                         smooth generator counts more: the toy world's plain samples of head concepts (which
                         cannot have copied) 0.06

Distances are Euclidean on the features as given, k = 3 as in Kynkaenniemi et al.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

K = 3  # neighbours: precision, recall, density and coverage need more than K images on either side they measure
KID_MINIMUM = 50  # real images of a class below which KID is left out (its estimate is mostly noise)
# Real images of a class below which `copies` is left out: an image drawn as the real ones are lies nearer a
# reference than all n of them 1 time in n + 1, so with 1 real image every other such image is a "copy"; 19 keep it
# at 5 % or less.
COPIES_MINIMUM = 19
COPY_SIDE = 32  # pixels: the size images are compared at for `copies`


def _radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row."""
    distances = torch.cdist(features, features)
    return distances.kthvalue(k + 1, dim=1).values  # the first is the row itself, at 0


def _in_balls(real: torch.Tensor, fake: torch.Tensor, k: int) -> torch.Tensor:
    """(n, m): whether fake row j lies in the k-NN ball of real row i, at [j, i]."""
    return torch.cdist(fake, real) <= _radii(real, k)[None]


def on_manifold(real: torch.Tensor, fake: torch.Tensor, k: int = K) -> torch.Tensor:
    """Whether each row of `fake` (n, D) lies in the k-NN ball of some row of `real` (m, D), m > k: what precision
    counts, row by row."""
    return _in_balls(real, fake, k).any(dim=1)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = K) -> tuple[float | None, float | None]:
    """(precision, recall) of `fake` (n, D) against `real` (m, D); None where a set has k rows or fewer."""
    precision = recall = None
    if len(real) > k:
        precision = float(on_manifold(real, fake, k).float().mean())
    if len(fake) > k:
        recall = float(on_manifold(fake, real, k).float().mean())
    return precision, recall


def round_trip_precision(real: torch.Tensor, round_trips: torch.Tensor, k: int = K) -> float | None:
    """Precision of `round_trips` (n, D) against `real` (n, D), where row i is real row i after some passage (a
    VAE's encode and decode), each judged against the real rows other than its own original, as if that original
    had never been among them: its ball is left out and so is its part in the other rows' k-NN radii (each radius
    then its row's k-th nearest without row i). This is the precision an unseen real image scores after that
    passage; with `round_trips` = `real`, an unseen real image's precision. None with k + 1 real rows or fewer."""
    if len(real) <= k + 1:
        return None
    distances = torch.cdist(real, real)  # [j, i]
    nearest = distances.topk(k + 2, dim=1, largest=False).values  # column 0: the row itself
    # real j's radius without real i: its (k+1)-th nearest other row where i is one of its k nearest, else its k-th
    radii = torch.where(distances <= nearest[:, k, None], nearest[:, k + 1, None], nearest[:, k, None])
    inside = torch.cdist(round_trips, real) <= radii.T  # [i, j]: round trip i in real j's ball without real i
    inside.fill_diagonal_(False)  # not against its own original
    return float(inside.any(dim=1).float().mean())


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = K) -> tuple[float | None, float | None]:
    """(density, coverage) of `fake` against `real`; None with k real rows or fewer."""
    if len(real) <= k:
        return None, None
    inside = _in_balls(real, fake, k)  # (n, m): fake j in real i's ball
    return float(inside.float().sum() / (k * len(fake))), float(inside.any(dim=0).float().mean())


def kid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Unbiased MMD^2 between `real` and `fake` with the cubic polynomial kernel."""
    d = real.shape[1]
    real, fake = real.double(), fake.double()

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.T / d + 1) ** 3

    m, n = len(real), len(fake)
    k_rr, k_ff, k_rf = kernel(real, real), kernel(fake, fake), kernel(real, fake)
    return float((k_rr.sum() - k_rr.diagonal().sum()) / (m * (m - 1))
                 + (k_ff.sum() - k_ff.diagonal().sum()) / (n * (n - 1)) - 2 * k_rf.mean())


def diversity(features: torch.Tensor) -> float | None:
    """Mean pairwise cosine distance of the rows; None for fewer than two."""
    n = len(features)
    if n < 2:
        return None
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    rows, cols = torch.triu_indices(n, n, offset=1)
    return float((1 - (unit @ unit.T))[rows, cols].mean())


def pixel_features(images: list[Image.Image], side: int = COPY_SIDE) -> torch.Tensor:
    """Images as rows of RGB values in [0, 1] at `side` x `side`: the space where a copy is a copy."""
    rows = [np.asarray(im.convert("RGB").resize((side, side), Image.BILINEAR), dtype=np.float32).ravel() / 255
            for im in images]
    return torch.from_numpy(np.stack(rows))


def copied(references: torch.Tensor, images: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor | None:
    """Whether each of `images` is nearer some reference than any of the `real` held-out images is; None with fewer
    than COPIES_MINIMUM real images (1 in n + 1 images drawn as the real ones are would be called copies; without
    real images the references' own spacing is no measure either: see the module's docstring)."""
    if real is None or len(real) < COPIES_MINIMUM:
        return None
    threshold = torch.cdist(real, references).min()
    return torch.cdist(images, references).min(dim=1).values < threshold


def copies(references: torch.Tensor, images: torch.Tensor, real: torch.Tensor | None = None) -> float | None:
    """Share of `images` that are `copied` from a reference; None with nothing to compare to."""
    flags = copied(references, images, real)
    return float(flags.float().mean()) if flags is not None else None


def set_quality(real: torch.Tensor | None, fake: torch.Tensor, reference_variety: torch.Tensor,
                fake_variety: torch.Tensor, reference_pixels: torch.Tensor, fake_pixels: torch.Tensor,
                real_pixels: torch.Tensor | None, kid_minimum: int = KID_MINIMUM) -> dict:
    """Every measure of one class's images: features of held-out real images (or None) and of the images
    (precision, recall, density, coverage, KID); the embeddings whose spread is the variety of the
    references and of the images (diversity_ratio); pixels of references, images and real images (copies)."""
    out: dict[str, float | None] = {}
    if real is not None:
        out["precision"], out["recall"] = precision_recall(real, fake)
        out["density"], out["coverage"] = density_coverage(real, fake)
        out["kid"] = kid(real, fake) if len(real) >= kid_minimum and len(fake) >= 2 else None
    else:
        out.update(dict.fromkeys(("precision", "recall", "density", "coverage", "kid")))
    ours, theirs = diversity(fake_variety), diversity(reference_variety)
    out["diversity_ratio"] = ours / theirs if ours is not None and theirs else None
    out["copies"] = copies(reference_pixels, fake_pixels, real_pixels)
    return out
