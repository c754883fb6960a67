"""The report's notes: what its figures cannot say, and what to do about it."""

from __future__ import annotations

from seedselect_cli import quality
from seedselect_cli.report_notes import SMALL_SET, heldout_notes, set_notes


def test_notes_say_what_the_figures_cannot():
    """One class: no top-1; a set smaller than SMALL_SET: its set measures are noise; a run whose data set has
    one class is not told to pass dataset_classes=true, which it did."""
    assert set_notes(5, 5, SMALL_SET, False) == ["top5 is left out: among 5 classes every image is in the top 5"]
    assert set_notes(20, 5, SMALL_SET, False) == []
    few = set_notes(20, 5, 2, False)
    assert len(few) == 1 and "a class has 2 images:" in few[0] and f"(n_images={SMALL_SET})" in few[0]
    assert f"(bootstrap.n_images={SMALL_SET})" in set_notes(20, 5, 2, False, "bootstrap")[0]
    # a run that fills each class up to 10 images, the fewest made 2: 16 gives that class 8
    assert f"(bootstrap.fill_to=16: {SMALL_SET} of the class with the fewest)" in set_notes(
        20, 5, 2, False, "bootstrap", fill_to=10)[0]
    # evaluate's images_per_class left images out: scoring more of them is the way, not drawing more
    assert f"; score at least {SMALL_SET} (images_per_class={SMALL_SET}) to compare sets" in \
        set_notes(20, 5, 2, False, "bootstrap", capped=True)[0]
    assert set_notes(1, 5, 16, False)[0].startswith("top1 and top5 are left out:")  # the names of the table's columns
    assert "dataset_classes=true" in set_notes(1, 5, 16, False)[0]
    assert "dataset_classes=true" not in set_notes(1, 5, 16, True)[0]
    assert "dataset_classes=true" not in set_notes(1, 5, 16, False, one_concept=True)[0]  # a folder of one concept


def test_heldout_notes_name_the_classes_short_of_real_images_and_where_they_were_looked_for():
    """Precision, density and coverage need more than K real images of a class, KID at least KID_MINIMUM, copies
    COPIES_MINIMUM: a class below any is counted in a note that says how many it has and where they came from; at
    the bounds, none."""
    sources = {"a": "dataset.split=test", "b": "dataset.split=test", "c": "/h/<class>", "d": "/h/<class>"}
    assert heldout_notes({"a": quality.KID_MINIMUM, "d": quality.KID_MINIMUM + 9}, sources) == []
    blank, no_kid, no_copies = heldout_notes({"a": 0, "b": quality.K, "c": quality.K + 1, "d": quality.KID_MINIMUM},
                                             sources)
    assert blank.startswith("precision, density, coverage and kid are left out for 2 classes of 4:")
    assert f"they have 0 to {quality.K} images (dataset.split=test)" in blank and "heldout=DIR" in blank
    assert no_kid.startswith("kid is left out for 1 class of 4:")
    assert f"it needs {quality.KID_MINIMUM} held-out real images" in no_kid and "they need 4" in blank and f"it has {quality.K + 1} images (/h/<class>)" in no_kid
    assert no_copies.startswith(f"copies is left out for 3 classes of 4: it needs {quality.COPIES_MINIMUM} held-out "
                                f"real images of a class or more (against n of them, 1 in n + 1 images drawn as the "
                                f"real ones are counts as a copy), they have 0 to {quality.K + 1} images")
    blank, no_copies = heldout_notes({"a": 1, "b": 1}, sources)
    assert "they have 1 image each (dataset.split=test);" in blank and "they have 1 image each" in no_copies
    _, no_copies = heldout_notes({"c": quality.COPIES_MINIMUM - 1, "d": quality.COPIES_MINIMUM}, sources)  # and kid
    assert no_copies.startswith("copies is left out for 1 class of 2:")
    none, no_copies = heldout_notes({"c": 0, "d": 0}, sources)
    assert none.startswith("precision, density, coverage and kid are left out for 2 classes of 2:")
    assert "they have none (/h/<class>);" in none and "they have none (/h/<class>);" in no_copies


def test_a_heldout_folder_without_a_class_s_folder_is_said_with_the_folders_it_has(tmp_path):
    from seedselect_cli.report_notes import heldout_folder_note

    assert heldout_folder_note(tmp_path, ["marsh finch"]).endswith("it has no sub-folders")
    for name in ("a.png", "b.jpg"):  # held-out images of one concept laid out as the folder config's references
        (tmp_path / name).write_bytes(b"")
    assert heldout_folder_note(tmp_path, ["marsh finch"]).endswith(
        f"it has no sub-folders but 2 images: move them into {tmp_path / 'marsh_finch'}/")
    assert "(and each other class's into its own)" in heldout_folder_note(tmp_path, ["marsh finch", "sea gull"])
    for name in ("a.png", "b.jpg"):
        (tmp_path / name).unlink()
    (tmp_path / "marsh_fnch").mkdir()
    (tmp_path / "Sea-Gull").mkdir()
    note = heldout_folder_note(tmp_path, ["marsh finch", "sea gull", "snow wren"])
    assert note.startswith(f"held-out images: {tmp_path} has no folder for 2 classes of 3 ('marsh finch', 'snow wren')")
    assert "its folders: Sea-Gull, marsh_fnch; rename marsh_fnch to marsh_finch if it holds 'marsh finch'" in note
    (tmp_path / "marsh_finch").mkdir()
    (tmp_path / "snow wren").mkdir()
    assert heldout_folder_note(tmp_path, ["marsh finch", "sea gull", "snow wren"]) is None
