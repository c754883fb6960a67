"""The report of `seedselect evaluate`, in RUN/report/: what scripts read and what people look at.

    report/metrics.json           the metrics, per class and overall (the contract for scripts)
    report/images.jsonl           what each instrument says of each image (judge, CLIP, precision, copies)
    report/sheets/<class>.png     references | plain Stable Diffusion | SeedSelect, one row each, each image marked
                                  where the judge names another class, where it copies a reference, and where its
                                  seed was never refined; then the first of the run's other marked images
    report/loss.png               each class's loss curves (the first 20, then the mean over all): the images' kept
                                  losses and their current iterates'
    report/index.html             all of it, offline, relative links only
"""

from __future__ import annotations

import html
import json
import logging
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps
from rich.console import Console
from rich.table import Table

from seedselect_cli.errors import count_of
from seedselect_cli.files.atomic import atomic_write, slugify
from seedselect_cli.files.images import load_rgb
from seedselect_cli.limits import SHOWN_CLASSES
from seedselect_cli.progress import never_improved
from seedselect_cli.quality import COPIES_MINIMUM

THUMB = 128
PER_ROW = 8
LABEL_WIDTH = 120


def row_names(made_by: str | None) -> dict[str, str]:
    """What each set of images is called in tables and sheets (the keys of metrics.json's sets); a
    `bootstrap` run's own images say so (`made_by`: the command that wrote the run, None when unknown)."""
    return {"seedselect": "SeedSelect bootstrap" if made_by == "bootstrap" else "SeedSelect", "plain": "plain"}


def contact_sheet(rows: list[tuple[str, list[Image.Image], list[list[tuple[str, str]]] | None]]) -> Image.Image:
    """One labelled row of thumbnails per (label, images, marks), at most `PER_ROW` images a row; `marks`, if given,
    are each image's (text, colour) lines, written across its foot (`image_marks`)."""
    width = LABEL_WIDTH + min(PER_ROW, max((len(images) for _, images, _ in rows), default=1)) * THUMB
    sheet = Image.new("RGB", (width, THUMB * len(rows)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    small = ImageFont.load_default(size=11)
    for r, (label, images, marks) in enumerate(rows):
        draw.text((8, r * THUMB + THUMB // 2 - 6), label, fill="black", font=font)
        for c, image in enumerate(images[:PER_ROW]):
            thumb = ImageOps.contain(image, (THUMB - 4, THUMB - 4))  # small images are scaled up too
            x = LABEL_WIDTH + c * THUMB + (THUMB - thumb.width) // 2
            sheet.paste(thumb, (x, r * THUMB + (THUMB - thumb.height) // 2))
            lines = marks[c] if marks else []
            for n, (text, colour) in enumerate(reversed(lines)):
                y = (r + 1) * THUMB - 4 - 13 * (n + 1)
                box = draw.textbbox((x + 2, y), text, font=small)
                draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill="white")
                draw.text((x + 2, y), text, fill=colour, font=small)
    return sheet


def judge_rejects(row: dict, name: str) -> bool:
    """Whether a judge scored the image (its images.jsonl `row`) and named something else than its class `name`."""
    return row.get("judge_label") is not None and row.get("judge_top1") != name


def image_marks(row: dict, name: str) -> list[tuple[str, str]]:
    """What a person should check on an image of class `name`, from its report/images.jsonl row: the judge's class
    where it is not `name`, an image unlike every held-out real one (what precision counts against it), a copy of a
    reference, a seed never refined (its start)."""
    marks = []
    if judge_rejects(row, name):
        marks.append((f"judge: {row['judge_label']}"[:22], "red"))
    if row.get("on_real_manifold") is False:
        marks.append(("unlike real images", "royalblue"))
    if row.get("copy"):
        marks.append(("copy", "darkorange"))
    if row.get("unrefined"):
        marks.append(("unrefined", "dimgray"))
    return marks


def marked_first(images: list[tuple[Path, dict]], name: str) -> list[tuple[Path, dict]]:
    """The marked ones of `images` (paths and images.jsonl rows of class `name`): those the judge rejects first, then
    copies, then the rest (unrefined, unlike real images, which can be half a tail class), each in the run's order."""
    def rank(row: dict) -> int:
        return 0 if judge_rejects(row, name) else 1 if row.get("copy") else 2

    return sorted(((path, row) for path, row in images if image_marks(row, name)), key=lambda image: rank(image[1]))


def loss_curves(histories: list[list[float]]) -> tuple[list[float], list[float]]:
    """A class's loss against iteration, mean over its images: of what each image keeps (its best iterate so far,
    carried to the end once its optimisation stopped) and of where each still-running seed is. The first ends at
    the mean of the images' kept losses; the second is what the optimiser sees, and AdamW's first step at the
    authors' lr often throws seeds far above their start (RESULTS.md)."""
    length = max(len(h) for h in histories)
    kept, current = [], []
    for i in range(length):
        kept.append(sum(min(h[:i + 1]) for h in histories) / len(histories))
        running = [h[i] for h in histories if i < len(h)]
        current.append(sum(running) / len(running))
    return kept, current


def plotted_classes(entries: list[dict]) -> tuple[list[tuple[str, list[dict]]], int]:
    """The loss plot's curves, each a name and its images' manifest entries: the first `SHOWN_CLASSES` classes in
    the run's order, then every image as "all N classes" where there are more; and the number of classes."""
    by_class: dict[str, list[dict]] = {}
    for entry in entries:
        by_class.setdefault(entry["class"], []).append(entry)
    curves = list(by_class.items())[:SHOWN_CLASSES]
    if len(by_class) > SHOWN_CLASSES:
        curves.append((f"all {len(by_class)} classes", entries))
    return curves, len(by_class)


def loss_plot(entries: list[dict], path: Path) -> None:
    """The loss against iteration of each class (the first 20, and the mean over all where there are more): the mean
    of the images' kept losses (solid) and of their current iterates' (dashed), with how many images never got below
    their start. The legend stands beside the axes, where it hides no curve."""
    logging.getLogger("matplotlib").setLevel(logging.ERROR)  # no "building the font cache" line in a run's output
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves, n_classes = plotted_classes(entries)
    figure, axes = plt.subplots(figsize=(9, 4), dpi=100)
    for name, of_class in curves:
        kept, current = loss_curves([e["loss_history"] for e in of_class])
        stuck = never_improved(of_class)
        every = n_classes > SHOWN_CLASSES and of_class is entries
        line, = axes.plot(range(len(kept)), kept, marker="o", markersize=3, linewidth=2.5 if every else 1.5,
                          color="black" if every else None, zorder=3 if every else 2,
                          label=f"{name} ({len(of_class)}" + (f", {stuck} never below start)" if stuck else ")"))
        axes.plot(range(len(current)), current, linestyle="--", alpha=0.5, color=line.get_color())
    axes.set_xlabel("iteration")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("loss (mean over the class's images)")
    axes.grid(alpha=0.3)
    shown = f"; the first {SHOWN_CLASSES} classes of {n_classes}" if n_classes > SHOWN_CLASSES else ""
    axes.set_title(f"solid: what each image keeps (its best iterate so far); dashed: its current iterate{shown}",
                   fontsize=8)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def _cell(value) -> str:
    return "" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def metric_keys(metrics: dict) -> list[str]:
    return [k for k in next(iter(metrics["overall"].values())) if k != "n_images"]


def index_html(metrics: dict, sheets: dict[str, str]) -> str:
    keys, methods, names = metric_keys(metrics), list(metrics["overall"]), row_names(metrics.get("made_by"))
    overall = _table([[names[m], metrics["overall"][m]["n_images"], *(metrics["overall"][m][k] for k in keys)]
                      for m in methods], ["images", "n", *keys])
    per_class = _table(
        [[name, names[m], c[m]["n_images"], *(c[m][k] for k in keys)]
         for name, c in metrics["classes"].items() for m in methods],
        ["class", "images", "n", *keys])
    refs = _table([[name, c["references"]["n_images"], c["references"]["diversity"],
                    c.get("heldout", {}).get("n_images"), c.get("heldout", {}).get("source")]
                   for name, c in metrics["classes"].items()],
                  ["class", "references", "diversity", "held-out real images", "taken from"])
    # lazily: a run of hundreds of classes has hundreds of sheets, tens of MB a page would load at once
    figures = "".join(f'<h3>{html.escape(name)}</h3><img src="{html.escape(src)}" alt="{html.escape(name)}" '
                      f'loading="lazy">' for name, src in sheets.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>seedselect report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>seedselect report</h1>
<p>{count_of(metrics['n_images'], 'image')}; zero-shot CLIP ({html.escape(str(metrics['clip']))}) among
{count_of(metrics['classified_among'], 'class', 'classes')}; fidelity: cosine similarity to the class's reference centroid;
diversity: mean pairwise CLIP distance. Against held-out real images, in
{html.escape(str(metrics.get('quality_space')))}: precision and recall (k-NN manifolds, k = 3), density
and coverage, KID; diversity_ratio: the images' diversity over the references'; copies: the share of
images nearer a reference than any held-out real image is. Baseline: {html.escape(str(metrics['baseline'] or
'skipped'))}.
Numbers: <a href="metrics.json">metrics.json</a>.</p>
{"".join(f"<p>{html.escape(note)}</p>" for note in metrics.get("notes", []))}
<h2>Overall</h2>{overall}
<h2>Per class</h2>{per_class}
<h2>References</h2>{refs}
<h2>Loss</h2><img src="loss.png" alt="loss curves">
<h2>Images (references | plain Stable Diffusion | {names["seedselect"]})</h2>
<p>Marks on an image: <i>judge: X</i>, the judge's label where it is not the image's class; <i>unlike real
images</i>, outside the neighbourhood of every held-out real image in the quality features (an image precision
counts against the set); <i>copy</i>, nearer a
reference than any held-out real image (not measured with fewer than {COPIES_MINIMUM}); <i>unrefined</i>, its seed
never got below its start's loss (an image that took no step, kept as drawn by <code>bootstrap.keep_drawn</code> or of a run of one
iteration, selection alone, is its start on purpose and not marked).
Every image, with what each measure says of it: <a href="images.jsonl">images.jsonl</a>.</p>
{figures}
</body></html>
"""


def write_report(run_dir: Path, metrics: dict, entries: list[dict], references: dict[str, list[Image.Image]],
                 sets: dict[str, list[Path]], per_image: list[dict]) -> Path:
    """Write RUN/report/ and return it (`per_image`: what each instrument says of each image, in `sets`' order)."""
    report, names = run_dir / "report", row_names(metrics.get("made_by"))
    sheets = {}
    for name, refs in references.items():
        rows = [("references", refs, None)]
        of_class = {method: [(p, r) for p, r in zip(paths, (r for r in per_image if r["set"] == method))
                             if r["class"] == name] for method, paths in sets.items()}
        # the run's marked images beyond its first row, so a class of hundreds shows what its marks point at
        later = marked_first(of_class["seedselect"][PER_ROW:], name)
        for label, shown in (*((names[m], of_class[m][:PER_ROW]) for m in ("plain", "seedselect") if m in sets),
                             *([(f"marked ({len(later)} more)", later[:PER_ROW])] if later else [])):
            rows.append((label, [load_rgb(p) for p, _ in shown], [image_marks(r, name) for _, r in shown]))
        relative = f"sheets/{slugify(name)}.png"
        sheet = contact_sheet(rows)
        atomic_write(report / relative, lambda tmp, sheet=sheet: sheet.save(tmp, format="PNG"))
        sheets[name] = relative
    loss_plot(entries, report / "loss.png")
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in per_image)
    atomic_write(report / "images.jsonl", lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    atomic_write(report / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2, ensure_ascii=False)))
    atomic_write(report / "index.html", lambda tmp: tmp.write_text(index_html(metrics, sheets), encoding="utf-8"))
    return report


QUALITY_KEYS = ("precision", "recall", "density", "coverage", "kid", "diversity_ratio", "copies")


def marks_line(per_image: list[dict], report: Path) -> str:
    """How many of the run's own images the contact sheets mark, and where to look."""
    ours = [r for r in per_image if r["set"] == "seedselect"]
    measured = [r for r in ours if r["copy"] is not None]  # not where a class has too few held-out real images
    copies = count_of(sum(r["copy"] for r in measured), "copy of a reference", "copies of a reference")
    too_few = f"under {COPIES_MINIMUM} held-out real images of the class"
    if not measured:
        copies = f"copies not measured ({too_few})"
    elif len(measured) < len(ours):
        copies += f" of {len(measured)} measured ({len(ours) - len(measured)} not: {too_few})"
    counts = [copies, f"{sum(r['unrefined'] for r in ours)} unrefined"]
    placed = [r["on_real_manifold"] for r in ours if r.get("on_real_manifold") is not None]
    if placed:  # not without held-out real images
        counts.insert(0, f"{placed.count(False)} unlike the held-out real images")
    if any(r["judge_label"] is not None for r in ours):
        counts.insert(0, f"{sum(judge_rejects(r, r['class']) for r in ours)} rejected by the judge")
    return (f"marked on the contact sheets ({report / 'sheets'}), of the run's {count_of(len(ours), 'image')}: "
            f"{', '.join(counts)}; every image's measures in {report / 'images.jsonl'}")


def terminal() -> Console:
    """rich's console, wide enough for the tables when piped."""
    return Console(width=None if sys.stdout.isatty() else 160)


def print_report_line(metrics: dict, console: Console) -> None:
    """Where the report is, on a line of its own, never wrapped (in a table's title it broke at the table's width)."""
    console.print(f"seedselect evaluate: {count_of(metrics['n_images'], 'image')}; report in "
                  f"{Path(metrics['run_dir']) / 'report'}", markup=False, highlight=False, soft_wrap=True)


def print_table(metrics: dict, per_image: list[dict] | None = None) -> None:
    """Two tables, one row per class and kind of image (SeedSelect, plain Stable Diffusion), the first
    `SHOWN_CLASSES` classes and overall: how often the images are the class, then how they sit among held-out real
    images; the notes, and with `per_image` (the rows of report/images.jsonl) what the contact sheets mark. Wide
    enough when piped."""
    keys, names = metric_keys(metrics), row_names(metrics.get("made_by"))
    groups = {"accuracy": [k for k in keys if k not in QUALITY_KEYS],
              f"beside real images ({metrics.get('quality_space', 'CLIP')})": [k for k in keys if k in QUALITY_KEYS]}
    console = terminal()
    print_report_line(metrics, console)
    for title, columns in groups.items():
        if not columns:
            continue
        table = Table(title=title)
        for column in ("class", "images", "n", *columns):
            table.add_column(column, justify="left" if column in ("class", "images") else "right")
        classes = list(metrics["classes"].items())
        rows = [*classes[:SHOWN_CLASSES], ("overall", metrics["overall"])]
        for r, (name, c) in enumerate(rows):
            if name == "overall" and len(classes) > SHOWN_CLASSES:
                table.add_row(f"... {count_of(len(classes) - SHOWN_CLASSES, 'more class', 'more classes')}", "",
                              "", *("" for _ in columns), end_section=True)
            for i, method in enumerate(metrics["overall"]):
                table.add_row(name if i == 0 else "", names[method], str(c[method]["n_images"]),
                              *(_cell(c[method][k]) for k in columns), end_section=i == len(metrics["overall"]) - 1
                              and r < len(rows) - 1)
        console.print(table)
    if len(metrics["classes"]) > SHOWN_CLASSES:
        console.print(f"every class: {Path(metrics['run_dir']) / 'report' / 'index.html'} and metrics.json there",
                      markup=False, highlight=False, soft_wrap=True)
    for note in metrics.get("notes", []):
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    if per_image:
        # the lines below the tables unwrapped: a path in them is never broken (a terminal wraps them itself)
        console.print(marks_line(per_image, Path(metrics["run_dir"]) / "report"), markup=False, highlight=False,
                      soft_wrap=True)


def training_table(results: dict) -> str:
    """The downstream table of `scripts/downstream_classifier.py` and `scripts/linear_probe.py`: one row per
    training set with its test accuracy (by frequency bucket where the data has buckets), then the
    Classification Accuracy Score of each synthetic set (trained on it alone, tested on real images)."""
    columns = [c for c in ("head", "middle", "tail", "all") if any(c in r for r in results["rows"].values())]
    lines = ["| training set | train images | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, row in results["rows"].items():
        cells = [f"{row[c]:.3f}" if row.get(c) is not None else "" for c in columns]
        lines.append(f"| {name} | {row['train_images']} | " + " | ".join(cells) + " |")
    if results.get("cas"):
        lines += ["", "Classification Accuracy Score (trained on the synthetic images alone, tested on real images "
                      "of the same classes): " + ", ".join(f"{k} {v:.3f}" for k, v in results["cas"].items())]
    return "\n".join(lines) + "\n"
