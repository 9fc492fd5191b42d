"""Typed configuration: every bad key, type or range is an error naming it."""

import pytest

from fedse.config import Config, ConfigError, config_from_dict, config_to_dict, load_config, parse_overrides


def test_defaults_and_round_trip():
    cfg = config_from_dict({})
    assert cfg == Config()
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_unknown_key_is_named_with_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'partition\.alhpa'.*allowed keys: .*'alpha'"):
        config_from_dict({"partition": {"alhpa": 0.1}})
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        config_from_dict({"trian": {}})


@pytest.mark.parametrize(
    "raw,pattern",
    [
        ({"train": {"lr": "fast"}}, r"'train\.lr': got 'fast' \(str\); allowed: a number"),
        ({"partition": {"num_clients": 2.5}}, r"'partition\.num_clients': got 2\.5.*an integer"),
        ({"data": {"download": "yes"}}, r"'data\.download': got 'yes'.*true/false"),
        ({"server": {"rounds": True}}, r"'server\.rounds': got True"),  # bool is not an int
        ({"partition": {"scheme": "dirichelt"}}, r"'partition\.scheme'.*one of 'iid', 'dirichlet'"),
        ({"partition": {"feature_skew": ["rotation", "blur"]}}, r"'partition\.feature_skew\[1\]': got 'blur'"),
        ({"train": 3}, r"'train': expected a mapping"),
    ],
)
def test_wrong_type_names_key_value_and_allowed(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(raw)


@pytest.mark.parametrize(
    "raw,pattern",
    [
        ({"partition": {"alpha": 0}}, r"'partition\.alpha': 0\.0 is out of range; allowed: \(0, inf\]"),
        ({"partition": {"num_clients": 0}}, r"'partition\.num_clients': 0 is out of range; allowed: \[1, 100000\]"),
        ({"server": {"fraction_train": 1.5}}, r"'server\.fraction_train': 1\.5 .*\(0, 1\]"),
        ({"train": {"momentum": -0.1}}, r"'train\.momentum'"),
        ({"partition": {"num_clients": 3}, "server": {"min_train_clients": 5}}, r"'server\.min_train_clients': 5"),
        ({"data": {"dataset": "imagefolder"}}, r"'data\.root'"),
    ],
)
def test_out_of_range_values_are_named(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(raw)


def test_int_is_accepted_for_float_and_coerced():
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0


def test_overrides_go_through_the_same_validation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("partition:\n  alpha: 0.5\nserver:\n  rounds: 2\n")
    cfg = load_config(path, ["partition.alpha=0.1", "partition.feature_skew=[rotation, noise]"])
    assert cfg.partition.alpha == 0.1 and cfg.server.rounds == 2
    assert cfg.partition.feature_skew == ("rotation", "noise")
    with pytest.raises(ConfigError, match=r"'partition\.alpha': -1\.0 is out of range"):
        load_config(path, ["partition.alpha=-1"])
    with pytest.raises(ConfigError, match="unknown config key 'partition.beta'"):
        load_config(path, ["partition.beta=1"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_overrides(["partition.alpha"])


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"quickstart.yaml", "fmnist_dir01.yaml", "cifar10_dir01.yaml"}
    for path in configs:
        load_config(path)


def test_config_accepts_exactly_the_registered_policies():
    import typing

    from fedse.config import PersonalizationConfig
    from fedse.split import POLICIES

    hints = typing.get_type_hints(PersonalizationConfig)
    assert set(typing.get_args(hints["policy"])) == set(POLICIES)


def test_label_prior_modes_are_one_list():
    # The config's choices, the modes fedse.prior implements, and every policy's own mode agree.
    import typing

    from fedse.config import PersonalizationConfig
    from fedse.prior import MODES
    from fedse.split import POLICIES

    (literal,) = [a for a in typing.get_args(typing.get_type_hints(PersonalizationConfig)["label_prior"])
                  if a is not type(None)]
    assert set(typing.get_args(literal)) == set(MODES)
    assert {p.label_prior for p in POLICIES.values()} <= set(MODES)
