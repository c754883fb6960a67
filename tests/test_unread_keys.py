"""The keys a command line set that the run does not read, said with what reads them."""

from __future__ import annotations

from seedselect_cli.unread_keys import keys_not_read, other_commands_keys, unread_keys
from tests.conftest import make_config


def test_a_key_of_the_other_command_is_said_with_what_this_one_reads():
    """`seedselect bootstrap n_images=100` makes bootstrap.n_images images: the user is told, not left to count."""
    config = make_config(["bootstrap.n_images=7", "n_images=2"])
    said = other_commands_keys("bootstrap", ["n_images=100", "optim.iterations=9", "loss.lam=0.5",
                                             "optim.backtrack=0.2"], config)
    assert said == [("n_images=100 is `seedselect optimize`'s: bootstrap makes bootstrap.n_images=7 images per class; "
                    "pass bootstrap.n_images=100"),
                    (f"optim.iterations=9 is `seedselect optimize`'s: bootstrap refines each image "
                    f"bootstrap.iterations={config.bootstrap.iterations} times"),
                    ("optim.backtrack=0.2 is `seedselect optimize`'s: bootstrap backtracks by bootstrap.backtrack=null (never); "
                     "pass bootstrap.backtrack=0.2")]
    said = other_commands_keys("optimize", ["bootstrap.n_images=100", "n_images=2"], config)
    assert len(said) == 1 and said[0].startswith("bootstrap.n_images=100 is `seedselect bootstrap`'s: optimize makes "
                                                 "n_images=2 images per class")
    assert other_commands_keys("optimize", ["n_images=2", "optim.iterations=9"], config) == []
    assert other_commands_keys("bootstrap", ["bootstrap.n_images=3", "seed=1"], config) == []
    filling = make_config(["bootstrap.fill_to=50"])
    assert other_commands_keys("bootstrap", ["bootstrap.n_images=3", "bootstrap.fill_to=50"], filling) == [
        "bootstrap.n_images=3 is not read with bootstrap.fill_to=50: each class gets the images that fill it up to 50"]


def test_a_key_the_config_does_not_read_is_said_with_the_key_it_waits_on():
    """`-m loss.temperature=0.01,0.05,0.1` with the centroid loss would make the same images three times without a
    word: a key that another key's value leaves unread is said, and read keys are not."""
    config = make_config()  # the centroid loss, random starts
    assert keys_not_read(["loss.temperature=0.2", "init.noise=0.3", "init.nao_points=4", "n_images=2"], config) == [
        ("loss.temperature=0.2 is not read with loss.semantic=centroid: it is the contrastive loss's tau "
        "(loss=contrastive)"),
        ("init.noise=0.3 is not read with init=random: it is for the starts from inverted references (init=inversion, "
        "nao or reference)"),
        "init.nao_points=4 is not read with init=random: it is for NAO's paths (init=nao with init.nao_paths=true)"]
    nao = make_config(["init=nao", "init.nao_paths=false"])
    assert keys_not_read(["init.noise=0.3", "init.nao_paths=false", "init.nao_iterations=5"], nao) == [
        ("init.nao_iterations=5 is not read with init.nao_paths=false: it is for NAO's paths (init=nao with "
        "init.nao_paths=true)")]
    assert keys_not_read(["init.nao_paths=false"], make_config(["init=inversion"])) == [
        "init.nao_paths=false is not read with init=inversion: it is for NAO's start (init=nao)"]
    contrastive = make_config(["loss=contrastive", "dataset.classes=[red disc,blue square]"], name="tiny")
    assert keys_not_read(["+init.nao_points=4", "init.noise=0.2"], make_config(["init=nao"])) == []
    assert keys_not_read(["loss.temperature=0.1"], contrastive) == []


def test_a_command_says_both_kinds_in_its_log():
    config = make_config()
    assert unread_keys("bootstrap", ["n_images=3", "loss.temperature=0.1"], config) == [
        *other_commands_keys("bootstrap", ["n_images=3"], config), *keys_not_read(["loss.temperature=0.1"], config)]
