"""experiments.common.prepare_workdir: --resume refuses a different config, and names what changed."""

import dataclasses
import json

import pytest

from experiments.common import ConfigError, parse_config, prepare_workdir


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
    with pytest.raises(ConfigError, match=r"--resume: .*config.json holds another config: lr: 0.1 -> 0.2"):
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


def test_without_resume_a_workdir_of_another_run_is_refused_and_kept(tmp_path):
    prepare_workdir(tmp_path, Config(), resume=False)
    prepare_workdir(tmp_path, Config(), resume=False)  # the same config (a run that never finished an epoch)
    with pytest.raises(ConfigError, match=r"--workdir: holds a run with another config \(lr differ\)"):
        prepare_workdir(tmp_path, Config(lr=0.2), resume=False)
    (tmp_path / "checkpoints" / "last" / "3").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"--workdir: holds the checkpoints of a run; pass --resume true"):
        prepare_workdir(tmp_path, Config(), resume=False)
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.1


@dataclasses.dataclass(frozen=True)
class Checked:
    epochs: int = 1
    lr: float = 0.1
    momentum: float = 0.9
    limit: int | None = None
    low: float = 1.0
    high: float = 2.0

    def check(self):
        if self.low >= self.high:
            raise ConfigError("high", f"must exceed --low {self.low:g}", self.high)


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "--epochs: must be >= 1 (got 0)"),
    (["--lr", "nan"], "--lr: must be a finite number > 0 (got nan)"),
    (["--lr=-1e-3"], "--lr: must be a finite number > 0 (got -1e-3)"),
    (["--momentum", "1"], "--momentum: must be in [0, 1) (got 1)"),
    (["--limit", "0"], "--limit: must be >= 1 (got 0)"),
    (["--high", "0.5"], "--high: must exceed --low 1 (got 0.5)"),
])
def test_parse_config_checks_every_value_and_repeats_what_was_typed(argv, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(Checked, argv)
    assert str(caught.value) == message


def test_parse_config_accepts_good_values_and_unset_optionals():
    assert parse_config(Checked, ["--limit", "5", "--lr", "1e-4"]) == Checked(limit=5, lr=1e-4)
    assert parse_config(Checked, []).limit is None


def test_the_default_policy_comes_from_the_environment_at_the_cli_edge(monkeypatch):
    from experiments.common import default_policy

    monkeypatch.setenv("JAXVGG_IMPL", "native")
    monkeypatch.setenv("JAXVGG_GEMM", "auto")
    monkeypatch.delenv("JAXVGG_CONV", raising=False)
    assert default_policy("vgg11").forms == "native" and default_policy("vgg11").gemm == "xla"
    assert default_policy("vgg11").conv == "xla"
    monkeypatch.setenv("JAXVGG_IMPL", "fastest")
    with pytest.raises(ConfigError, match=r"^\$JAXVGG_IMPL, \$JAXVGG_GEMM, \$JAXVGG_CONV: forms='fastest'.*"
                                          r"\(got fastest, auto, auto\)$"):
        default_policy("vgg11")
    monkeypatch.setenv("JAXVGG_IMPL", "cpu")
    monkeypatch.setenv("JAXVGG_CONV", "cudnn")
    with pytest.raises(ConfigError, match=r"conv='cudnn'; expected auto or one of xla, onednn.*"
                                          r"\(got cpu, auto, cudnn\)$"):
        default_policy("vgg11")
