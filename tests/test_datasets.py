"""Dataset adapters on small layouts built on disk."""

from __future__ import annotations

import re
import shutil

import pytest

from seedselect_cli.errors import UserError
from seedselect_cli.files.datasets import DatasetConfig, load_classes
from tests.layouts import make_cifar_fs, make_cub, make_imagefolder, make_imagenet_lt, make_mini_imagenet


def test_folder_is_named_after_the_directory_or_the_given_class(reference_folder):
    [record] = load_classes(DatasetConfig(name="folder", root=str(reference_folder)), seed=0)
    assert record.name == "blue_thing" and record.prompt == "a photo of a blue thing" and len(record.images) == 4
    assert record.label is None  # one concept: no numbering of classes to share
    [named] = load_classes(DatasetConfig(name="folder", root=str(reference_folder), classes=["tiger cat"]), 0)
    assert named.name == "tiger cat" and named.prompt == "a photo of a tiger cat"


def test_shots_are_drawn_reproducibly(reference_folder):
    cfg = DatasetConfig(name="folder", root=str(reference_folder), shots=2)
    first = load_classes(cfg, seed=0)[0].images
    assert len(first) == 2 and load_classes(cfg, seed=0)[0].images == first
    assert len({load_classes(cfg, seed=s)[0].images for s in range(8)}) > 1


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="not an existing folder"):
        load_classes(DatasetConfig(name="folder", root=str(tmp_path / "nope")), 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no image files"):
        load_classes(DatasetConfig(name="folder", root=str(tmp_path / "empty")), 0)


def test_photos_in_a_format_not_read_are_said_not_silently_passed_over(reference_folder, caplog):
    """A phone's HEIC photos beside JPEGs: the references are the readable ones, and the log says which were
    passed over and what to do; a quiet second reading (the job after preflight, evaluate) does not say it again."""
    for name in ("IMG_0042.HEIC", "IMG_0043.avif"):
        (reference_folder / name).write_bytes(b"\0\0\0\x18ftypheic")
    (reference_folder / "notes.txt").write_text("where I took them")  # not a photo: nothing to say
    with caplog.at_level("WARNING"):
        [record] = load_classes(DatasetConfig(name="folder", root=str(reference_folder)), seed=0)
    assert len(record.images) == 4 and all(p.suffix == ".png" for p in record.images)
    [said] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said.startswith(f"{reference_folder}: 2 photos passed over (IMG_0042.HEIC, IMG_0043.avif): seedselect "
                           f"reads bmp, gif, jpeg, jpg,") and said.endswith("to use them as references, convert to JPEG or PNG")
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_classes(DatasetConfig(name="folder", root=str(reference_folder)), seed=0, quiet=True)
    assert not caplog.records


def test_cub_layout(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011")
    cfg = DatasetConfig(name="cub", root=str(root), shots=2, prompt_template="a photo of a {}, a type of bird.")
    records = load_classes(cfg, seed=0)
    assert [r.name for r in records] == ["Black footed Albatross", "Pine Warbler"]
    assert records[1].prompt == "a photo of a Pine Warbler, a type of bird."
    # classes.txt's id - 1, as ImageFolder(CUB_200_2011/images) numbers its sorted folders
    assert [r.label for r in records] == [0, 1] == [sorted(p.name for p in (root / "images").iterdir()).index(d)
                                                    for d in ("001.Black_footed_Albatross", "094.Pine_Warbler")]
    assert all(len(r.images) == 2 and all(p.is_file() and "_3.jpg" not in p.name for p in r.images)
               for r in records)  # image 3 of each class is in the test split
    [warbler] = load_classes(DatasetConfig(name="cub", root=str(root), classes=["094.Pine_Warbler"]), 0)
    assert warbler.name == "Pine Warbler" and len(warbler.images) == 3
    with pytest.raises(UserError, match="no class named 'Pine Warblr'"):
        load_classes(DatasetConfig(name="cub", root=str(root), classes=["Pine Warblr"]), 0)
    with pytest.raises(UserError, match=r"no class named 'Zebra' in this dataset\. Its classes: Black footed"):
        load_classes(DatasetConfig(name="cub", root=str(root), classes=["Zebra"]), 0)  # nothing close: a sentence
    for every in ("all", "*", "All"):  # what people type for every class
        with pytest.raises(UserError, match=rf"no class named '{re.escape(every)}' in this dataset \(for every class of the "
                                            r"data set's split, pass dataset\.classes=null\)\. Its classes:"):
            load_classes(DatasetConfig(name="cub", root=str(root), classes=[every]), 0)
    for typed in ("pine-warbler", "PINE_WARBLER", " Pine  Warbler "):  # spellings that name one class
        assert load_classes(DatasetConfig(name="cub", root=str(root), classes=[typed]), 0) == [warbler], typed
    one_level_up = load_classes(DatasetConfig(name="cub", root=str(root.parent), classes=["Pine Warbler"]), 0)
    assert one_level_up[0].images == warbler.images
    for inside in (root / "images", root / "images" / "094.Pine_Warbler"):  # the images folder given for the root
        with pytest.raises(UserError, match=f"is not a CUB_200_2011 folder: .* missing; it lies inside one: pass "
                                            f"dataset.root={re.escape(str(root.resolve()))}$"):
            load_classes(DatasetConfig(name="cub", root=str(inside)), 0)
    with pytest.raises(UserError, match="train_test_split.txt missing$"):  # no data set above: nothing more said
        (tmp_path / "elsewhere").mkdir()
        load_classes(DatasetConfig(name="cub", root=str(tmp_path / "elsewhere")), 0)
    (root / "classes.txt").unlink()
    with pytest.raises(UserError, match="classes.txt missing"):
        load_classes(DatasetConfig(name="cub", root=str(root)), 0)


def test_cub_classes_are_found_as_field_guides_spell_them(tmp_path):
    """CUB's folders drop hyphens and possessives (`Black_footed_Albatross`, `Brewer_Blackbird`, `Chuck_will_Widow`);
    a list copied from a field guide spells them ("Black-footed Albatross", "Brewer's Blackbird", "Chuck-will's-widow",
    a typographic apostrophe too). Each names its class, which keeps the data set's name (its folder, prompt and
    shots as before); a loose spelling that two classes share names neither."""
    root = make_cub(tmp_path / "CUB_200_2011", classes=("001.Black_footed_Albatross", "009.Brewer_Blackbird",
                                                        "020.Chuck_will_Widow", "094.Pine_Warbler"))
    canonical = load_classes(DatasetConfig(name="cub", root=str(root)), 0)
    typed = ["Black-footed Albatross", "Brewer's Blackbird", "Chuck-will\u2019s-widow", "pine warbler"]
    assert load_classes(DatasetConfig(name="cub", root=str(root), classes=typed), 0) == canonical
    assert canonical[1].prompt == "a photo of a Brewer Blackbird"  # the data set's name, whatever was typed

    folders = make_imagefolder(tmp_path / "twins", classes=("rock-wren", "rock's wren", "sea gull"))
    with pytest.raises(UserError, match="no class named 'Rock Wren'"):  # two classes spelled that way: neither
        load_classes(DatasetConfig(name="imagefolder", root=str(folders), classes=["Rock Wren"]), 0)
    [wren] = load_classes(DatasetConfig(name="imagefolder", root=str(folders), classes=["ROCK'S WREN"]), 0)
    assert wren.name == "rock's wren"  # an exact name (in any case) is not loose


def test_mini_imagenet_layout(tmp_path):
    root = make_mini_imagenet(tmp_path / "mini")
    records = load_classes(DatasetConfig(name="mini_imagenet", root=str(root), shots=2), 0)
    assert [r.name for r in records] == ["house finch", "American robin"]  # n01532829, n01558993: the train csv
    assert [r.label for r in records] == [12, 15]  # their ImageNet-1k labels
    assert all(len(r.images) == 2 and all(p.is_file() for p in r.images) for r in records)
    novel = load_classes(DatasetConfig(name="mini_imagenet", root=str(root), split="test"), 0)
    assert [r.name for r in novel] == ["nematode", "red king crab"] and all(len(r.images) == 3 for r in novel)
    [by_id] = load_classes(DatasetConfig(name="mini_imagenet", root=str(root), classes=["n01558993"]), 0)
    assert by_id.name == "American robin" and by_id.prompt == "a photo of an American robin"
    (root / "val.csv").write_text("file,class\nx.jpg,n01855672\n")
    with pytest.raises(UserError, match="header 'filename,label'"):
        load_classes(DatasetConfig(name="mini_imagenet", root=str(root), split="val"), 0)
    with pytest.raises(UserError, match="dataset.split='novel'"):
        load_classes(DatasetConfig(name="mini_imagenet", root=str(root), split="novel"), 0)


def test_cifar_fs_layout(tmp_path):
    root = make_cifar_fs(tmp_path / "cifar100")
    records = load_classes(DatasetConfig(name="cifar_fs", root=str(root), shots=2), 0)
    assert [r.name for r in records] == ["apple", "aquarium fish"]
    assert records[1].prompt == "a photo of an aquarium fish" and all(len(r.images) == 2 for r in records)
    every = sorted(p.name for p in (root / "data").iterdir())  # all splits' classes: CIFAR-100's fine labels
    assert [r.label for r in records] == [every.index("apple"), every.index("aquarium_fish")] == [0, 1]
    [pepper] = load_classes(DatasetConfig(name="cifar_fs", root=str(root), split="test",
                                          classes=["sweet_pepper"]), 0)
    assert pepper.name == "sweet pepper" and all("sweet_pepper" in p.parent.name for p in pepper.images)
    with pytest.raises(UserError, match="splits/bertinetto/train.txt missing"):
        load_classes(DatasetConfig(name="cifar_fs", root=str(tmp_path)), 0)


def test_imagenet_lt_layout(tmp_path):
    root = make_imagenet_lt(tmp_path / "imagenet")
    records = load_classes(DatasetConfig(name="imagenet_lt", root=str(root), shots=3), 0)
    assert [(r.name, len(r.images)) for r in records] == [("tench", 3), ("house finch", 2), ("toilet paper", 1)]
    assert [r.split_images for r in records] == [5, 2, 1]  # all of the split's, not the shots
    assert [r.label for r in records] == [0, 12, 999]  # the list's labels
    [finch] = load_classes(DatasetConfig(name="imagenet_lt", root=str(root), classes=["n01532829"]), 0)
    assert finch.name == "house finch" and all(p.parent.name == "n01532829" for p in finch.images)
    (root / "ImageNet_LT_train.txt").write_text("train/x.JPEG 1000\n")
    with pytest.raises(UserError, match="not an ImageNet-1k index"):
        load_classes(DatasetConfig(name="imagenet_lt", root=str(root)), 0)


def test_max_images_takes_the_rare_classes_of_the_split(tmp_path, caplog):
    """`dataset.max_images=N`: the classes with at most N images in the split (ImageNet-LT's few-shot classes are
    those with fewer than 20), their references drawn as before; a named class with more is left out with a warning;
    none left, or N below 1, is an error. Held-out images come from all of a class's images, whatever N is."""
    from seedselect_cli.files.datasets import heldout_images
    from tests.conftest import make_config

    root = make_imagenet_lt(tmp_path / "imagenet", counts={0: 5, 12: 2, 999: 1, 1: 3})
    every = load_classes(DatasetConfig(name="imagenet_lt", root=str(root), shots=1), 0)
    rare = load_classes(DatasetConfig(name="imagenet_lt", root=str(root), shots=1, max_images=2), 0)
    assert [r.name for r in rare] == ["house finch", "toilet paper"]  # tench 5 and goldfish 3 left out
    assert rare == [r for r in every if r.name in ("house finch", "toilet paper")]  # the same references
    named = DatasetConfig(name="imagenet_lt", root=str(root), classes=["tench", "house finch"], max_images=2)
    with caplog.at_level("WARNING"):
        assert [r.name for r in load_classes(named, 0)] == ["house finch"]
    assert "'tench' has 5 images in dataset.split=train, more than dataset.max_images=2: leaving it out" in caplog.text
    with pytest.raises(UserError, match=r"dataset.max_images=2: no ImageNet-LT class of dataset.split=train named "
                                        r"in dataset.classes has so few images \(the fewest: 3\)"):
        load_classes(DatasetConfig(name="imagenet_lt", root=str(root), classes=["tench", "goldfish"], max_images=2), 0)
    rare_finch = DatasetConfig(name="imagenet_lt", root=str(root), shots=1, max_images=1)
    [toilet] = load_classes(rare_finch, 0)
    assert len(heldout_images(rare_finch, 0, toilet, None).images) == 0  # its one image is its reference
    few = DatasetConfig(name="imagenet_lt", root=str(root), shots=1, max_images=3)
    [goldfish] = [r for r in load_classes(few, 0) if r.name == "goldfish"]
    assert len(heldout_images(few, 0, goldfish, None).images) == 2
    val = [f"val/finch_{i}.JPEG" for i in range(4)]  # the other split has more of a class than max_images
    (root / "val").mkdir()
    for path in val:
        shutil.copy(rare[0].images[0], root / path)
    (root / "ImageNet_LT_val.txt").write_text("".join(f"{path} 12\n" for path in val))
    held = heldout_images(DatasetConfig(name="imagenet_lt", root=str(root), max_images=2), 0, rare[0], None)
    assert held.source == "dataset.split=val" and len(held.images) == 4
    with pytest.raises(UserError, match="dataset.max_images=0 is invalid: must be at least 1"):
        make_config(["dataset.max_images=0"])


def test_imagefolder_layout(tmp_path):
    root = make_imagefolder(tmp_path / "classes")
    (root / "empty_class").mkdir()
    for litter in (".ipynb_checkpoints", "__MACOSX"):  # a notebook's and an unzipped archive's
        (root / litter).mkdir(parents=True)
        shutil.copy(root / "red_fox" / "0.png", root / litter / "0.png")
    records = load_classes(DatasetConfig(name="imagefolder", root=str(root)), 0)
    assert [r.name for r in records] == ["red fox", "snow leopard"]  # the empty folder is passed over
    assert [r.label for r in records] == [1, 2]  # among the sorted class folders: empty_class, red_fox, snow leopard
    assert all(len(r.images) == 3 for r in records)
    with pytest.raises(UserError, match="'empty class' has no images"):
        load_classes(DatasetConfig(name="imagefolder", root=str(root), classes=["empty_class"]), 0)
    with pytest.raises(UserError, match="no class sub-folders"):
        load_classes(DatasetConfig(name="imagefolder", root=str(root / "red_fox")), 0)
    shutil.copytree(root / "red_fox", root / "red fox")  # one class in two folders: neither may hide the other
    with pytest.raises(UserError, match="the folders 'red fox' and 'red_fox' are both class 'red fox'"):
        load_classes(DatasetConfig(name="imagefolder", root=str(root)), 0)


def test_numbered_and_wordnet_folders_are_read_as_the_names_a_prompt_needs(tmp_path):
    """CUB's `images/` and ImageNet's `train/` are ImageFolders whose folder names are no words: `094.Pine_Warbler`
    and `n01532829`. Their classes, prompts and what `evaluate`'s CLIP reads are `Pine Warbler` and `house finch`;
    `dataset.classes` takes the folder's name too. A name that only starts with a number stays whole."""
    root = make_imagefolder(tmp_path / "images", classes=("094.Pine_Warbler", "n01532829", "3.5_inch_floppy",
                                                          "n99999999"))
    records = load_classes(DatasetConfig(name="imagefolder", root=str(root)), 0)
    assert [(r.name, r.prompt, r.label) for r in records] == [
        ("Pine Warbler", "a photo of a Pine Warbler", 0), ("3.5 inch floppy", "a photo of a 3.5 inch floppy", 1),
        ("house finch", "a photo of a house finch", 2), ("n99999999", "a photo of a n99999999", 3)]  # ImageFolder's
    [picked] = load_classes(DatasetConfig(name="imagefolder", root=str(root), classes=["n01532829"]), 0)
    assert picked.name == "house finch"
    [one] = load_classes(DatasetConfig(name="folder", root=str(root / "094.Pine_Warbler")), 0)
    assert (one.name, one.prompt) == ("Pine_Warbler", "a photo of a Pine Warbler")  # folder keeps its underscores


def test_every_adapter_is_known_to_the_config_check():
    from seedselect_cli.files import datasets
    from seedselect_cli.files.datasets import DATASETS

    for name in DATASETS:  # each name reaches its adapter: an empty root is an error of that adapter, not 'unknown'
        with pytest.raises(UserError) as info:
            datasets.load_classes(DatasetConfig(name=name, root=None), 0)
        assert "dataset.root is not set" in str(info.value)
    with pytest.raises(UserError, match="unknown"):
        datasets.load_classes(DatasetConfig(name="coco", root=None), 0)


def test_prompts_say_an_before_a_vowel_and_fewer_images_than_shots_are_said(tmp_path, caplog):
    from seedselect_cli.files.datasets import fill_template

    assert fill_template("a photo of a {}", "apple") == "a photo of an apple"
    assert fill_template("a photo of a {}, a type of bird.", "Ovenbird") == "a photo of an Ovenbird, a type of bird."
    assert fill_template("a photo of a {}", "pear") == "a photo of a pear"
    assert fill_template("{} in a field", "owl") == "owl in a field"
    root = make_cub(tmp_path / "CUB_200_2011")
    with caplog.at_level("WARNING"):
        records = load_classes(DatasetConfig(name="cub", root=str(root), shots=50), seed=0)
    assert all(len(r.images) == 3 for r in records)
    assert "has 3 images, fewer than dataset.shots=50: using all of them" in caplog.text
    caplog.clear()
    folder = root / "images" / "094.Pine_Warbler"  # one folder of one concept says it too
    with caplog.at_level("WARNING"):
        [record] = load_classes(DatasetConfig(name="folder", root=str(folder), shots=50), seed=0)
    assert len(record.images) == len(list(folder.iterdir())) < 50
    assert f"folder class 'Pine_Warbler' has {len(record.images)} images, fewer than dataset.shots=50" in caplog.text


def test_a_held_out_class_folder_is_found_however_it_is_named(tmp_path):
    """heldout=DIR: a class's folder may be named as the class in any case, with `_` or `-` for spaces, with a
    CUB-style number, as its run-directory slug, or by its WordNet id (ImageNet's own val/ layout); an exact name
    wins over a looser one, and another class's folder is never taken."""
    from seedselect_cli.files.datasets import class_folder

    for folder in ("Marsh Finch", "marsh-finch", "094.Marsh_Finch", "MARSH_FINCH", "Marsh's Finch"):
        (tmp_path / folder).mkdir()
        assert class_folder(tmp_path, "marsh finch") == tmp_path / folder, folder
        (tmp_path / folder).rmdir()
    (tmp_path / "marsh_finches").mkdir()
    (tmp_path / "n01532829").mkdir()  # house finch
    assert class_folder(tmp_path, "marsh finch") is None
    assert class_folder(tmp_path, "house finch") == tmp_path / "n01532829"
    (tmp_path / "house finch").mkdir()
    (tmp_path / "House-Finch").mkdir()
    assert class_folder(tmp_path, "house finch") == tmp_path / "house finch"
    assert class_folder(tmp_path, "café crème") is None
    (tmp_path / "Café Crème").mkdir()
    assert class_folder(tmp_path, "café crème") == tmp_path / "Café Crème"


def test_classes_can_be_listed_in_a_file(tmp_path):
    """`dataset.classes_file=tail.txt`: one name a line (as typed or as the data set spells it), blank lines and
    `#` comments passed over, a BOM too; read into dataset.classes, which the run directory keeps, not the file."""
    from tests.conftest import make_config

    root = make_cub(tmp_path / "CUB_200_2011", classes=("001.Black_footed_Albatross", "009.Brewer_Blackbird",
                                                        "094.Pine_Warbler"))
    listed = tmp_path / "tail.txt"
    listed.write_text("\ufeff# the tail\nBlack-footed Albatross\n\n  094.Pine_Warbler  \n", encoding="utf-8")
    config = make_config([f"dataset.root={root}", f"dataset.classes_file={listed}"], name="cub_tail")
    assert config.dataset.classes == ["Black-footed Albatross", "094.Pine_Warbler"]
    assert config.dataset.classes_file is None
    assert [r.name for r in load_classes(config.dataset, 0)] == ["Black footed Albatross", "Pine Warbler"]
    with pytest.raises(UserError, match=r"dataset.classes=\['Pine Warbler'\] and dataset.classes_file both name"):
        make_config([f"dataset.root={root}", f"dataset.classes_file={listed}", "dataset.classes=[Pine Warbler]"])
    with pytest.raises(UserError, match=r"classes_file both name the classes: pass one of them .* as the demo does, "
                                        r"add dataset.classes=null\)"):  # the demo names its class
        make_config([f"dataset.classes_file={listed}"], name="demo")
    assert make_config([f"dataset.classes_file={listed}", "dataset.classes=null", f"dataset.root={root}"],
                       name="cub_tail").dataset.classes == ["Black-footed Albatross", "094.Pine_Warbler"]
    with pytest.raises(UserError, match=r"dataset.classes_file=.*nope.txt cannot be read \(No such file"):
        make_config([f"dataset.classes_file={tmp_path / 'nope.txt'}"])
    listed.write_text("# nothing but comments\n\n")
    with pytest.raises(UserError, match="names no class: write one name a line"):
        make_config([f"dataset.classes_file={listed}"])
    listed.write_bytes(b"Pine Warbler\ncaf\xe9\n")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        make_config([f"dataset.classes_file={listed}"])
