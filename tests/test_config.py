import pytest
import yaml
from typer.testing import CliRunner

from medtransfer.config import available_presets, load_config, parse_override
from medtransfer.errors import ConfigError


def test_preset_loads_with_typed_values():
    cfg = load_config("xray")
    assert cfg.modality == "xray"
    assert cfg.augment.hflip is False  # never flip chest X-ray by default
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(1e-3)
    assert "xray" in available_presets()


def test_override_and_user_yaml_order(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({"train": {"head_epochs": 7, "lr": 0.01}, "data": {"size": 64}}))
    cfg = load_config("xray", user, ["train.head_epochs=2", "train.lr=1e-4"])
    assert cfg.train.head_epochs == 2  # --set wins over --config
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.size == 64  # --config wins over the preset
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.head_epoch=3", "Did you mean 'train.head_epochs'?"),
        ("trian.lr=0.1", "Did you mean 'train'?"),
        ("train.head_epochs=three", "must be an integer"),
        ("train.lr=-1", "below its minimum"),
        ("data.window=tag", "Did you mean 'tags'?"),
        ("augment.hflip=maybe", "true or false"),
        ("train.lr", "section.key=value"),
    ],
)
def test_bad_config_fails_with_hint(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("xray", overrides=[override])
    assert message in str(err.value)


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'xray'"):
        load_config("xrya")


def test_cli_config_error_exits_2_before_any_work(tmp_path):
    from medtransfer.cli.main import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["finetune", "--set", "train.epochs=3", "--out", str(out)])
    assert result.exit_code == 2
    assert "Unknown config key 'train.epochs'" in result.output
    assert not out.exists()  # nothing was started
    result = CliRunner().invoke(app, ["finetune", "--backbone", "efficientnet_lite9", "--out", str(out)])
    assert result.exit_code == 2
    assert "Did you mean" in result.output


@pytest.mark.parametrize("override, key, want", [
    ("train.amp=off", "amp", "off"),                  # YAML 1.1 reads off as False
    ("train.feature_cache=on", "feature_cache", "on"),
    ("train.feature_cache=off", "feature_cache", "off"),
])
def test_on_off_words_stay_words(override, key, want, tmp_path):
    assert getattr(load_config("xray", overrides=[override]).train, key) == want
    user = tmp_path / "user.yaml"
    user.write_text(f"train:\n  {key}: {want}\n")  # unquoted in a YAML file, the same
    assert getattr(load_config("xray", config_file=user).train, key) == want


def test_a_boolean_where_no_on_off_choice_exists_is_still_an_error():
    with pytest.raises(ConfigError, match="train.bn_policy must be a string, got True"):
        load_config("xray", overrides=["train.bn_policy=yes"])


def test_regression_is_not_offered_until_it_works_end_to_end():
    """model.task lists only the tasks the package trains, evaluates and predicts; regression would need a
    float label column, MAE / RMSE with patient CIs and a value column in predict, which it does not have."""
    with pytest.raises(ConfigError, match="regression.*not allowed.*ordinal"):
        load_config("xray", overrides=["model.task=regression"])
