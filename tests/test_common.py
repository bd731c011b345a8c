"""experiments.common.prepare_workdir: --resume refuses a different config, and names what changed."""

import dataclasses
import json

import pytest

from experiments.common import prepare_workdir


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float = 0.1
    layer: str = "classifier_4"
    epochs: int = 10
    resume: bool = False
    quiet: bool = False
    sizes: tuple = (1, 2)


def test_resume_accepts_the_same_config_and_new_epochs(tmp_path):
    prepare_workdir(tmp_path, Config(), resume=False)
    prepare_workdir(tmp_path, Config(epochs=30, resume=True, quiet=True), resume=True)  # tuples read back as lists
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 30


def test_resume_refuses_a_changed_option_and_names_it(tmp_path):
    prepare_workdir(tmp_path, Config(), resume=False)
    with pytest.raises(ValueError, match=r"config.json: lr: 0.1 -> 0.2"):
        prepare_workdir(tmp_path, Config(lr=0.2), resume=True)
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.1  # the saved config is kept


def test_an_option_added_since_the_run_began_matches_at_its_default(tmp_path):
    old = dataclasses.asdict(Config())
    del old["layer"]  # written before the option existed
    (tmp_path / "config.json").write_text(json.dumps(old))
    prepare_workdir(tmp_path, Config(resume=True), resume=True)
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"layer: 'classifier_4' -> 'features_15'"):
        prepare_workdir(tmp_path, Config(layer="features_15"), resume=True)
