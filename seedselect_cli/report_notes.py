"""What a report's figures cannot say, in the words of its notes (metrics.json's `notes`, the terminal, index.html):
classification among too few classes, sets too small to measure, too few held-out real images, a run not finished."""

from __future__ import annotations

import collections
import dataclasses
import difflib
from pathlib import Path

from seedselect_cli import quality
from seedselect_cli.config import Config
from seedselect_cli.errors import UserError, count_of
from seedselect_cli.files.atomic import slugify
from seedselect_cli.files.datasets import class_folder, load_classes, name_key, subfolders
from seedselect_cli.files.images import list_images

SMALL_SET = 8  # images of a class below which the set measures are one or two images' worth of noise


def set_notes(n_classes: int, top_k: int, fewest_images: int, dataset_classes: bool, method: str | None = None,
              one_concept: bool = False, capped: bool = False, fill_to: int | None = None) -> list[str]:
    """What the figures cannot say for this run, said in metrics.json and the report. `method`: the command that
    made the run (`made_by`), whose key sets its images per class (`fill_to`: its bootstrap.fill_to, which does
    instead); `one_concept`: its data set holds one class (the `folder` layout), so that dataset_classes=true adds
    none; `capped`: evaluate's `images_per_class` left out images the run has, so more are scored by raising it."""
    images_key = "images_per_class" if capped else "bootstrap.n_images" if method == "bootstrap" else "n_images"
    how = f"{images_key}={SMALL_SET}"
    if not capped and method == "bootstrap" and fill_to is not None:
        how = f"bootstrap.fill_to={fill_to + SMALL_SET - fewest_images}: {SMALL_SET} of the class with the fewest"
    verb = "score" if capped else "draw"
    out = []
    if n_classes == 1:
        out.append(f"top1 and top{top_k} are left out: classifying among one class is right by construction; pass "
                   + ("classes=[...] (the run's data set has this class alone)" if dataset_classes or one_concept
                      else "classes=[...] or dataset_classes=true") + " to classify among more")
    elif n_classes <= top_k:
        out.append(f"top{top_k} is left out: among {n_classes} classes every image is in the top {top_k}")
    if fewest_images < SMALL_SET:
        out.append(f"a class has {count_of(fewest_images, 'image')}: its precision, recall, density, coverage, kid, "
                   f"diversity_ratio and copies change by 1/{fewest_images} or more with each image, so they "
                   f"tell little; {verb} at least {SMALL_SET} ({how}) to compare sets"
                   + (f" (with {quality.K} or fewer, recall is left out)" if fewest_images <= quality.K else ""))
    return out


def heldout_notes(real_images: dict[str, int], sources: dict[str, str]) -> list[str]:
    """Why measures against held-out real images are blank for some classes: too few real images of them (per class
    in `real_images`; `sources`, where each class's were looked for), and where to point for more."""
    blank = {c: n for c, n in real_images.items() if n <= quality.K}
    no_kid = {c: n for c, n in real_images.items() if quality.K < n < quality.KID_MINIMUM}
    no_copies = {c: n for c, n in real_images.items() if n < quality.COPIES_MINIMUM}
    out = []
    for measures, need, short_of, needed, why in (
            ("precision, density, coverage and kid are", "they need", blank, quality.K + 1, ""),
            ("kid is", "it needs", no_kid, quality.KID_MINIMUM, ""),
            ("copies is", "it needs", no_copies, quality.COPIES_MINIMUM,
             " (against n of them, 1 in n + 1 images drawn as the real ones are counts as a copy)")):
        if short_of:
            low, high = min(short_of.values()), max(short_of.values())
            if low != high:
                have = f"{low} to {high} images"
            else:
                have = "none" if low == 0 else count_of(low, "image") + (" each" if len(short_of) > 1 else "")
            where = "; ".join(dict.fromkeys(sources[c] for c in short_of))
            out.append(f"{measures} left out for {count_of(len(short_of), 'class', 'classes')} of {len(real_images)}: "
                       f"{need} {needed} held-out real images of a class or more{why}, "
                       f"{'it has' if len(short_of) == 1 else 'they have'} {have} ({where}); "
                       f"point heldout=DIR at more (DIR/<class>/<image>)")
    return out


def one_reference_notes(reference_counts: dict[str, int]) -> list[str]:
    """Why diversity_ratio is blank for the classes with one reference (a 1-shot run): it divides by the
    references' own variety, which needs two."""
    alone = [c for c, n in reference_counts.items() if n < 2]
    if not alone:
        return []
    of = f"{count_of(len(alone), 'class', 'classes')} of {len(reference_counts)} with one reference"
    return [f"diversity_ratio is left out for {of}: it divides the images' diversity by the references' own, which "
            + "needs two; diversity, the images' own, is there (two references or more give the ratio)"]


def heldout_folder_note(root: Path, classes: list[str]) -> str | None:
    """The classes that a `heldout=DIR` holds no folder for (a typo, or another naming), and the folders it does
    hold, with the nearest to the first such class; None where every class has its folder."""
    missing = [c for c in classes if class_folder(root, c) is None]
    if not missing:
        return None
    folders = [child.name for child in subfolders(root)]
    if not folders and (images := list_images(root)):  # a one-concept set laid out as the `folder` config's references
        has = (f"it has no sub-folders but {count_of(len(images), 'image')}: move them into "
               f"{root / slugify(missing[0])}/" + (" (and each other class's into its own)" if len(classes) > 1 else ""))
    elif not folders:
        has = "it has no sub-folders"
    else:
        near = difflib.get_close_matches(name_key(missing[0]), [name_key(f) for f in folders], n=1, cutoff=0.6)
        guess = next((f for f in folders if near and name_key(f) == near[0]), None)
        has = (f"its folders: {', '.join(folders[:8])}{f', ... ({len(folders)} in all)' if len(folders) > 8 else ''}"
               + (f"; rename {guess} to {slugify(missing[0])} if it holds {missing[0]!r}" if guess else ""))
    shown = ", ".join(repr(c) for c in missing[:5]) + (", ..." if len(missing) > 5 else "")
    return (f"held-out images: {root} has no folder for {count_of(len(missing), 'class', 'classes')} of {len(classes)} ({shown}): a "
            f"class's folder is named as the class (in any case, with _ or - for spaces), as its folder in the run's "
            f"images/, or by its WordNet id; {has}")


def run_images_asked(config: Config, method: str) -> dict[str, int]:
    """The images a run's command asks for of each class, its data set read as the run read it (with
    `bootstrap.fill_to`, those that fill each class up; a class it leaves full is not counted); {} where the data set
    can no longer be read."""
    try:
        records = load_classes(dataclasses.replace(config.dataset, shots=1), config.seed, quiet=True)
    except UserError:
        return {}
    return {r.name: n for r in records if (n := config.images_asked(method, r.split_images))}


def unfinished_note(config: Config, entries: list[dict], method: str | None, active: bool) -> str | None:
    """What a report of a run still being made (or stopped) covers: None where every image it asks for is there."""
    if method not in ("optimize", "bootstrap"):
        return None
    asked = run_images_asked(config, method)
    made = collections.Counter(e["class"] for e in entries)
    have = sum(min(made[c], n) for c, n in asked.items())
    wanted = sum(asked.values())
    if have >= wanted:
        return None
    then = ("another process is still making them (RUN/.active)" if active
            else f"run the same `seedselect {method}` in it to finish")
    classes = count_of(len(asked), "class", "classes")
    fill_to = config.bootstrap.fill_to if method == "bootstrap" else None
    each = (f"{classes}, each filled up to bootstrap.fill_to={fill_to} with its real images" if fill_to is not None
            else f"{config.images_asked(method, 0)} of each of {classes}")
    return (f"the run is not finished: these figures are of {count_of(have, 'image')} of the {wanted} it asks for "
            f"({each}); {then}")


def first_images_note(per_class: int | None, scored: int, made: int) -> list[str]:
    """That the figures are of each class's first images (`images_per_class`), where that left some out."""
    if per_class is None or scored == made:
        return []
    first = "the first image" if per_class == 1 else f"the first {per_class} images"
    note = (f"the figures are of {first} of each class (images_per_class={per_class}): {scored} of the run's "
            f"{made}, the same indices for plain sampling")
    return [note]
