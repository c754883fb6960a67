"""The run directory: safe class folders, atomic files, a manifest that survives interruption."""

from __future__ import annotations

import json
import os

import pytest

from seedselect_cli.errors import UserError
from seedselect_cli.files.atomic import atomic_write, slugify
from seedselect_cli.files.run_directory import RunDirectory


@pytest.mark.parametrize("name", ["Pine Warbler", "a/b", "..", "../../etc", "Mésange bleue", "鳥", "", "x" * 300])
def test_slugs_are_safe_single_path_components(name, tmp_path):
    slug = slugify(name)
    assert slug and "/" not in slug and slug not in (".", "..") and not slug.startswith(".")
    assert len(slug) <= 120 and slug.isascii()
    assert (tmp_path / slug).resolve().parent == tmp_path.resolve()


def test_slugs_stay_readable_and_distinct():
    assert slugify("Pine Warbler") == "Pine_Warbler"
    assert slugify("a/b") != slugify("a_b") and slugify("鳥") != slugify("猫")
    # names longer than a slug may be, alike but for their ends (a long caption as a class name): distinct too
    stem = "a photo of a small grey bird with a short bill " * 3
    for ends in (("perched", "flying"), ("perched/", "flying/")):
        slugs = {slugify(stem + end) for end in ends}
        assert len(slugs) == 2 and all(len(slug) <= 120 and slug.startswith("a_photo_of") for slug in slugs)


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "file.txt"
    atomic_write(target, lambda tmp: tmp.write_text("first"))

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "first" and os.listdir(tmp_path) == ["file.txt"]


def test_manifest_drops_half_written_and_orphaned_lines(tmp_path):
    run = RunDirectory(tmp_path)
    run.start("seed: 0\n")
    for index in range(2):
        for path in (run.image_path("c", index), run.seed_path("c", index)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
        run.append_manifest({"class": "c", "index": index, "image": f"images/c/{index:05d}.png",
                             "seed_file": f"seeds/c/{index:05d}.safetensors"})
    run.image_path("c", 1).unlink()  # its file is gone: not finished
    with open(tmp_path / "manifest.jsonl", "a") as handle:
        handle.write('{"class": "c", "index": 2, "ima')  # killed mid-line
    RunDirectory(tmp_path).start("seed: 0\n")
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0]
    assert set(RunDirectory(tmp_path).finished()) == {("c", 0)}


def test_the_metadata_of_images_made_before_they_carried_a_dataset_label_gets_it_on_the_next_start(tmp_path):
    """`dataset_label` (the class's label as the data set numbers it) is in each new entry; images of an older
    version have none in their manifest line, and the next command in the run directory writes it into
    images/metadata.jsonl from the data set, leaving the manifest as it was."""
    run = RunDirectory(tmp_path)
    run.start("seed: 0\n")
    for name, index, label in (("Pine Warbler", 0, None), ("Pine Warbler", 1, 93), ("Sea Gull", 0, None)):
        slug = slugify(name)
        for path in (run.image_path(slug, index), run.seed_path(slug, index)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
        entry = {"class": name, "index": index, "image": f"images/{slug}/{index:05d}.png",
                 "seed_file": f"seeds/{slug}/{index:05d}.safetensors"}
        run.append_manifest(entry if label is None else {**entry, "dataset_label": label})
    manifest = (tmp_path / "manifest.jsonl").read_text()

    def labels():
        return [json.loads(line).get("dataset_label") for line in (tmp_path / "images" / "metadata.jsonl").open()]

    assert labels() == [None, 93, None]
    RunDirectory(tmp_path).start("seed: 0\n", labels={"Pine Warbler": 93, "Sea Gull": 7})
    assert labels() == [93, 93, 7] and (tmp_path / "manifest.jsonl").read_text() == manifest


def test_a_run_directory_of_another_config_is_refused(tmp_path):
    RunDirectory(tmp_path).start("seed: 0\nn_images: 1\nloss:\n  lam: 0.5\nruntime:\n  batch_size: 1\n")
    RunDirectory(tmp_path).start("seed: 0\nn_images: 3\nloss:\n  lam: 0.5\nruntime:\n  batch_size: 4\n")
    RunDirectory(tmp_path).start("seed: 0\nn_images: 3\nloss:\n  lam: 0.5\nsampler:\n  checkpointing: false\n")
    RunDirectory(tmp_path).start("seed: 0\nn_images: 3\nloss:\n  lam: 0.5\ndataset:\n  max_images: 19\n")  # classes
    with pytest.raises(UserError, match=r"another config \(loss.lam"):
        RunDirectory(tmp_path).start("seed: 0\nn_images: 3\nloss:\n  lam: 0.9\n")
    # every key that differs is named, up to three, so that a user does not find them one failed command at a time
    with pytest.raises(UserError, match=r"another config \(loss.lam: 0.5 there, 0.9 now; seed: 0 there, 1 now\); resume "
                                        r"with the same settings \(loss.lam=0.5 seed=0\) or"):
        RunDirectory(tmp_path).start("seed: 1\nn_images: 3\nloss:\n  lam: 0.9\n")
    with pytest.raises(UserError, match=r"another config \(optim.backtrack: null there, 0.5 now\); resume with the "
                                        r"same settings \(optim.backtrack=null\) or"):  # as typed, not Python's None
        RunDirectory(tmp_path).start("seed: 0\nn_images: 3\nloss:\n  lam: 0.5\noptim:\n  backtrack: 0.5\n",
                                     defaults_yaml="optim:\n  backtrack: null\n")
    # three described, every one set back (up to 8): a model option that brings its sampler changes five keys
    with pytest.raises(UserError, match=r"; optim.x: not set there, 2 now; 2 more\); resume with the same settings "
                                        r"\(loss.lam=0.5 ~optim.lr ~optim.x seed=0 ~z\) or"):
        RunDirectory(tmp_path).start("seed: 1\nn_images: 3\nloss:\n  lam: 0.9\noptim:\n  lr: 1\n  x: 2\nz: 0\n")
    # a key only one side has is said in Hydra's syntax, which adds (`+key=value`) or removes (`~key`) it
    with pytest.raises(UserError, match=r"another config \(loss.lam: 0.5 there, not set now; optim.x: not set there, 2 "
                                        r"now\); resume with the same settings \(\+loss.lam=0.5 ~optim.x\) or"):
        RunDirectory(tmp_path).start("seed: 0\nn_images: 3\noptim:\n  x: 2\n")


def test_the_settings_that_resume_a_run_of_another_config_paste_into_a_shell_as_one_word_each(tmp_path):
    """A list and a string with spaces, as a model option's sampler and kstep change them: pasted, each word is the
    override that gives the earlier run's value back (read by Hydra's own parser)."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    earlier = "kstep:\n  weights: [0.05, 0.25, 0.7]\nsampler:\n  name: ddim\n  negative_prompt: blurry, low quality\n"
    RunDirectory(tmp_path).start(earlier)
    with pytest.raises(UserError) as info:
        RunDirectory(tmp_path).start("kstep:\n  weights: [1.0]\nsampler:\n  name: euler\n  negative_prompt: ''\n")
    words = shlex.split(str(info.value).split("resume with the same settings (")[1].split(") or")[0])
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(words)}
    assert parsed == {"kstep.weights": [0.05, 0.25, 0.7], "sampler.name": "ddim",
                      "sampler.negative_prompt": "blurry, low quality"}, words


def test_a_run_of_an_older_version_resumes_when_a_new_key_keeps_its_default(tmp_path):
    old = "seed: 0\nloss:\n  lam: 0.5\n"  # written before `init` existed
    defaults = "seed: 0\nloss:\n  lam: 0.9\ninit:\n  method: random\n  noise: 0.2\n"
    RunDirectory(tmp_path).start(old)
    RunDirectory(tmp_path).start(old + "init:\n  method: random\n  noise: 0.2\n", defaults_yaml=defaults)
    (tmp_path / "config.yaml").write_text(old)
    with pytest.raises(UserError, match=r"another config \(init.method: 'random' there, 'nao' now"):
        RunDirectory(tmp_path).start(old + "init:\n  method: nao\n  noise: 0.2\n", defaults_yaml=defaults)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_run_directory_is_a_user_error(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(UserError, match="not writable"):
            RunDirectory(tmp_path / "run").start("seed: 0\n")
    finally:
        tmp_path.chmod(0o700)


def test_the_manifest_read_again_is_what_a_fresh_read_sees_whatever_happened_to_it_between(tmp_path):
    """A run reads the manifest before each class, parsing only what was appended since. Against a fresh read after
    each of a random sequence of what happens to it: appends by another process, a line half written then finished,
    a repair that rewrites it (same length, other content), a cut, a name with U+2028 in it."""
    import random

    rng = random.Random(61)
    root = tmp_path / "run"
    ours = RunDirectory(root)
    path = root / "manifest.jsonl"
    for c in ("a", "b\u2028c"):
        (root / "images" / slugify(c)).mkdir(parents=True)
        (root / "seeds" / slugify(c)).mkdir(parents=True)

    def line(index: int) -> bytes:
        name = rng.choice(["a", "b\u2028c"])
        entry = {"class": name, "index": index, "image": f"images/{slugify(name)}/{index:05d}.png",
                 "seed_file": f"seeds/{slugify(name)}/{index:05d}.safetensors", "loss": rng.random()}
        for key in ("image", "seed_file"):
            (root / entry[key]).touch()
        return (json.dumps(entry, ensure_ascii=False) + "\n").encode()

    path.write_bytes(b"")
    kinds = []
    for step in range(60):
        data = path.read_bytes()
        kind = rng.choice(["append", "append", "half", "rewrite", "cut"])
        kinds.append(kind)
        if kind == "append":
            data += line(step)
        elif kind == "half":  # a line half written: not counted, then counted once finished
            new = line(step)
            path.write_bytes(data + new[: len(new) // 2])
            assert ours._read_manifest() == RunDirectory(root)._read_manifest()
            data += new
        elif kind == "rewrite" and data.count(b"\n") >= 1:  # a repair: a new file, its length, another loss
            lines = data[: data.rfind(b"\n")].split(b"\n")
            rewritten = b"\n".join([*lines[:-1], lines[-1].replace(b'"loss": 0.', b'"loss": 1.'), b""])
            atomic_write(path, lambda tmp, rewritten=rewritten: tmp.write_bytes(rewritten))
            data = path.read_bytes()
        elif kind == "cut":
            data = data[: rng.randrange(len(data) + 1)]
        if kind != "rewrite":
            with open(path, "r+b") as handle:  # in place, as appends and a truncation are: the same file
                handle.truncate(0)
                handle.write(data)
        seen, fresh = ours._read_manifest(), RunDirectory(root)._read_manifest()
        assert seen == fresh, (step, kind)
        assert ours.finished("a") == {k: v for k, v in RunDirectory(root).finished().items() if k[0] == "a"}
    assert {"append", "half", "rewrite", "cut"} <= set(kinds)
    assert any(e["class"] == "b\u2028c" for e in RunDirectory(root)._read_manifest())  # one line, not two halves


def test_a_class_references_are_listed_as_sha256sum_checks_them(tmp_path, caplog):
    """RUN/references/<class>.sha256: `sha256sum -c` run in dataset.root checks it (GNU coreutils' format, a name
    with a line break or backslash escaped); a list that changes (the data set's files changed) is said."""
    import hashlib
    import shutil
    import subprocess

    from seedselect_cli.files.images import file_sha256

    data = tmp_path / "data"
    names = ["a.png", "sub/b c.png", "new\nline.png", "back\\slash.png"]
    for name in names:
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(name.encode() * 3)
    paths = [data / n for n in names]
    digests = [file_sha256(p) for p in paths]
    assert digests[0] == hashlib.sha256(b"a.png" * 3).hexdigest()
    run = RunDirectory(tmp_path / "run")
    run.start("seed: 0\n")
    run.record_references("c", paths, digests, str(data))
    listed = run.references_path("c")
    assert listed.read_text().splitlines()[:2] == [f"{digests[0]}  a.png", f"{digests[1]}  sub/b c.png"]
    if shutil.which("sha256sum"):
        checked = subprocess.run(["sha256sum", "-c", str(listed)], check=False, cwd=data, capture_output=True,
                                 text=True)
        assert checked.returncode == 0 and checked.stdout.count(": OK") == 4, checked.stdout + checked.stderr
    caplog.set_level("WARNING")
    run.record_references("c", paths, digests, str(data))
    assert "listed other references" not in caplog.text
    run.record_references("c", paths[:2], digests[:2], str(data))
    assert "listed other references" in caplog.text and len(listed.read_text().splitlines()) == 2
    run.record_references("d", [tmp_path / "elsewhere.png"], [digests[0]], str(data))  # outside the root: absolute
    assert run.references_path("d").read_text() == f"{digests[0]}  {tmp_path / 'elsewhere.png'}\n"
