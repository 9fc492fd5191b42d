"""Typed configuration: every bad key, type or range is an error naming it."""

import pytest

from fedse.config import (
    CONFIG_SCHEMA,
    Config,
    ConfigError,
    config_from_dict,
    config_from_record,
    config_to_dict,
    config_to_record,
    load_config,
    parse_overrides,
)
from fedse.spec import resolve


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
        resolve(config_from_dict(raw))  # the config's own types, or a registry's names


@pytest.mark.parametrize(
    "raw,pattern",
    [
        ({"partition": {"alpha": 0}}, r"'partition\.alpha': 0\.0 is out of range; allowed: \(0, inf\]"),
        ({"partition": {"num_clients": 0}}, r"'partition\.num_clients': 0 is out of range; allowed: \[1, 100000\]"),
        ({"server": {"fraction_train": 1.5}}, r"'server\.fraction_train': 1\.5 .*\(0, 1\]"),
        ({"train": {"momentum": -0.1}}, r"'train\.momentum'"),
        ({"partition": {"num_clients": 3}, "server": {"min_train_clients": 5}}, r"'server\.min_train_clients': 5"),
        ({"data": {"dataset": "imagefolder"}}, r"'data\.root'"),
        ({"partition": {"samples_per_client": 50}}, r"'partition\.samples_per_client': 50 is only used by .*dirichlet"),
        ({"partition": {"scheme": "iid", "size_sigma": 0.3}}, r"'partition\.size_sigma': 0\.3 is only used by"),
    ],
)
def test_out_of_range_values_are_named(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        resolve(config_from_dict(raw))


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


# --------------------------------------------------------------------------- hostile values (issue 13)


def _float_keys():
    """Every float-typed key of every section (float and float | None), found by walking the dataclasses."""
    import dataclasses
    import typing

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, key = hints[f.name], f"{prefix}{f.name}"
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, key + ".")
            elif tp is float or float in typing.get_args(tp):
                yield key

    return list(walk(Config, ""))


def _nested(dotted, value):
    raw = value
    for part in reversed(dotted.split(".")):
        raw = {part: raw}
    return raw


def test_the_float_walk_finds_every_section():
    keys = _float_keys()
    assert {
        "train.lr",
        "partition.alpha",
        "privacy.clipping_norm",
        "privacy.noise_multiplier",
        "train.private_lr_scale",
        "simulation.client_cpus",
        "server.round_timeout",
    } <= set(keys)
    assert {k.split(".")[0] for k in keys} >= {"partition", "train", "server", "simulation", "privacy"}


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 10**400])
def test_every_float_key_refuses_nan_and_inf(key, value):
    with pytest.raises(ConfigError, match=rf"config key '{key}': got .*; allowed: a finite number"):
        config_from_dict(_nested(key, value))


def test_yaml_nan_and_inf_overrides_are_refused():
    for item, key in [
        ("train.lr=.nan", "train.lr"),
        ("partition.alpha=.inf", "partition.alpha"),
        ("privacy.clipping_norm=.inf", "privacy.clipping_norm"),
        ("train.private_lr_scale=-.inf", "train.private_lr_scale"),
    ]:
        with pytest.raises(ConfigError, match=rf"'{key}': got -?(nan|inf); allowed: a finite number"):
            load_config(None, [item])


@pytest.mark.parametrize(
    "name", ["../../x", "..", ".", "", "a/b", "/abs/run", "a\\b", "C:run", " run", "run\n", "r\x00n"]
)
def test_output_name_must_be_one_plain_folder_name(name):
    with pytest.raises(
        ConfigError, match=r"config key 'output\.name': .*(is not a plain folder name|NUL character); allowed"
    ):
        config_from_dict({"output": {"name": name}})


@pytest.mark.parametrize("name", ["run1", "my run", "fedse-la.seed0", "..hidden", None])
def test_plain_output_names_are_accepted(name):
    assert config_from_dict({"output": {"name": name}}).output.name == name


def test_nul_in_any_string_is_refused():
    with pytest.raises(ConfigError, match=r"'output\.dir'.*NUL"):
        config_from_dict({"output": {"dir": "runs\x00x"}})
    with pytest.raises(ConfigError, match=r"'data\.root'.*NUL"):
        config_from_dict({"data": {"root": "a\x00"}})


def test_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; allowed: a YAML file"):
        load_config(tmp_path)


def test_config_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="cannot be read as UTF-8"):
        load_config(bad)


def test_numeric_yaml_keys_do_not_crash_the_unknown_key_message():
    with pytest.raises(ConfigError, match="unknown config key"):
        config_from_dict({"train": {1: 2, "x": 3}})


def test_max_num_examples():
    assert Config().server.max_num_examples is None
    assert config_from_dict({"server": {"max_num_examples": 500}}).server.max_num_examples == 500
    with pytest.raises(ConfigError, match=r"'server\.max_num_examples': 0 is out of range; allowed: \[1, inf\]"):
        config_from_dict({"server": {"max_num_examples": 0}})
    with pytest.raises(ConfigError, match=r"'server\.max_num_examples': got 2\.5.*an integer or null"):
        config_from_dict({"server": {"max_num_examples": 2.5}})


def test_noise_multiplier_must_be_positive():
    with pytest.raises(ConfigError, match=r"'privacy\.noise_multiplier': 0\.0 is out of range; allowed: \(0, inf\]"):
        config_from_dict({"privacy": {"mode": "sample", "noise_multiplier": 0}})
    assert config_from_dict({"privacy": {"mode": "client", "noise_multiplier": 0.1}}).privacy.noise_multiplier == 0.1


def test_secure_mode_needs_torchcsprng():
    import importlib.util

    assert Config().privacy.secure_mode is False
    if importlib.util.find_spec("torchcsprng") is not None:
        pytest.skip("torchcsprng is installed here")
    with pytest.raises(ConfigError, match=r"'privacy\.secure_mode'.*torchcsprng.*pip install torchcsprng.*os\.urandom"):
        resolve(config_from_dict({"privacy": {"secure_mode": True}}))
    with pytest.raises(ConfigError, match=r"'privacy\.secure_mode': got 'yes'"):
        config_from_dict({"privacy": {"secure_mode": "yes"}})


@pytest.mark.parametrize("strategy,ok", [("fedavg", True), ("fedprox", True), ("fedadam", False)])
def test_client_level_dp_refuses_fedadam(strategy, ok):
    raw = {"privacy": {"mode": "client", "noise_multiplier": 1.0}, "server": {"strategy": strategy}}
    if ok:
        assert resolve(config_from_dict(raw)).cfg.server.strategy == strategy
    else:
        with pytest.raises(
            ConfigError,
            match=r"'server\.strategy': 'fedadam'.*privacy\.mode=client.*allowed: "
            r"fedavg, fedprox",
        ):
            resolve(config_from_dict(raw))
    assert resolve(config_from_dict({"server": {"strategy": "fedadam"}})).cfg.server.strategy == "fedadam"  # no DP


def test_bf16_is_refused_with_sample_level_dp():
    from fedse.config import ConfigError

    resolve(config_from_dict({"train": {"bf16": True}}))
    with pytest.raises(ConfigError, match="'train.bf16'.*privacy.mode=sample"):
        resolve(
            config_from_dict(
                {
                    "train": {"bf16": True},
                    "model": {"norm": "groupnorm"},
                    "privacy": {"mode": "sample", "noise_multiplier": 1.0},
                }
            )
        )


def _without_smoothing(record):
    del record["personalization"]["prior_smoothing"]
    return record


def test_a_record_keeps_the_meaning_it_was_written_with():
    """A run's written-down config carries its schema: a key an older record lacks takes the value runs
    then had (add-one prior smoothing before schema 2), not today's default (16); one a user's file
    omits is today's default."""
    cfg = config_from_dict({"personalization": {"policy": "fedse-la", "prior_smoothing": 4}})
    record = config_to_record(cfg)
    assert record["schema"] == CONFIG_SCHEMA == 3 and config_from_record(record) == cfg
    legacy = _without_smoothing({k: v for k, v in config_to_dict(cfg).items()})  # no schema: before schemas
    assert config_from_record(legacy).personalization.prior_smoothing == 1.0
    assert "prior_smoothing" not in legacy["personalization"]  # the caller's mapping is left alone
    current = _without_smoothing(config_to_record(cfg))  # schema 2 lacking it: today's default
    assert config_from_record(current).personalization.prior_smoothing == 16.0
    assert config_from_dict(legacy).personalization.prior_smoothing == 16.0  # a user's mapping


@pytest.mark.parametrize("schema", [0, 4, "2", True, 2.0, None])
def test_a_record_of_an_unknown_schema_is_refused(schema):
    with pytest.raises(ConfigError, match=r"config record key 'schema': .*allowed: an integer in \[1, 3\]"):
        config_from_record({**config_to_record(Config()), "schema": schema})
    with pytest.raises(ConfigError, match="config record: expected a mapping, got list"):
        config_from_record([1])


def test_load_config_reads_a_run_folders_record_as_a_record(tmp_path):
    import yaml

    path = tmp_path / "config.yaml"
    record = _without_smoothing(config_to_record(Config()))
    path.write_text(yaml.safe_dump({**record, "schema": 1}))  # written by a run under schema 1
    assert load_config(path).personalization.prior_smoothing == 1.0
    assert load_config(path, ["personalization.prior_smoothing=8"]).personalization.prior_smoothing == 8.0
    path.write_text(yaml.safe_dump({k: v for k, v in record.items() if k != "schema"}))
    assert load_config(path).personalization.prior_smoothing == 16.0  # a user's file: today's default
    assert load_config(path, record=True).personalization.prior_smoothing == 1.0  # a run's, from before schemas


def test_a_record_with_a_yaml_date_is_one_error(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("schema: 1\nseed: 2026-11-30\n")  # YAML reads a date, which JSON cannot hold
    with pytest.raises(ConfigError, match="'seed'"):
        load_config(path)


def _alias_bomb(levels: int) -> str:
    """'Billion laughs' under a real key: every level lists the one before it nine times, so the file
    names 9**levels strings in a few hundred bytes."""
    items = ["&l0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    items += [f"&l{n} [{','.join([f'*l{n - 1}'] * 9)}]" for n in range(1, levels)]
    return "seed: [" + ",".join(items) + "]\n"


@pytest.mark.parametrize("record", [False, True])  # True: a run folder's config.yaml (predict --split, --resume)
def test_a_yaml_alias_bomb_is_one_short_error_naming_the_file(tmp_path, record):
    path = tmp_path / "config.yaml"
    path.write_text(_alias_bomb(9))  # 9**9 strings: 2 GB once printed
    assert len(path.read_bytes()) < 400
    with pytest.raises(ConfigError, match=r"config file '.*config\.yaml' is refused: more than 250000 values") as info:
        load_config(path, record=record)
    assert "allowed: YAML of at most 32 levels and 250000 values with every alias" in str(info.value)
    assert len(str(info.value)) < 1000


def test_an_error_echoes_at_most_200_characters_of_a_value(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(_alias_bomb(5))  # 59,049 strings: within the bound, the wrong type for seed
    with pytest.raises(
        ConfigError, match=r"config key 'seed': got \[\['lol'.*\.\.\. \(\d+ characters\) \(list\)"
    ) as info:
        load_config(path)
    assert len(str(info.value)) < 400
    with pytest.raises(ConfigError, match=r"'output\.name': 'a/a/a.*\.\.\. \(6002 characters\) is not a plain") as info:
        config_from_dict({"output": {"name": "a/" * 3000}})
    assert len(str(info.value)) < 600
    with pytest.raises(ConfigError, match=r"override 'x+\.\.\. \(10002 characters\) must look like") as info:
        parse_overrides(["x" * 10_000])
    assert len(str(info.value)) < 400
    with pytest.raises(ConfigError, match=r"'train\.lr': got 'x+\.\.\. \(10002 characters\) \(str\)") as info:
        load_config(None, ["train.lr=" + "x" * 10_000])
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(
    "text,pattern",
    [
        ("seed: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 32 levels"),
        (
            "seed: [&a " + "[" * 20 + "]" * 20 + ", " + "[" * 16 + "*a" + "]" * 17 + "\n",
            "nested deeper than 32 levels once",
        ),
        ("seed: &a [*a]\n", "an alias \\(\\*name\\) inside the value it names"),
        ("seed: 1" + "0" * 5000 + "\n", "an integer of 5001 characters"),
    ],
)
def test_deep_recursive_or_huge_yaml_is_refused_before_it_is_built(tmp_path, text, pattern):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"config file '.*config\.yaml' is refused: {pattern}"):
        load_config(path)
    key, _, value = text.partition(": ")
    with pytest.raises(ConfigError, match=rf"override '{key}=.*: value refused \({pattern}"):
        parse_overrides([f"{key}={value.strip()}"])


def test_a_config_file_larger_than_4_mib_is_refused_unread(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("# padding\n" * 500_000)
    with pytest.raises(ConfigError, match=r"config file '.*' is larger than 4194304 bytes"):
        load_config(path)


@pytest.mark.parametrize(
    "raw,pattern",
    [
        ({"seed": 2**80}, r"'seed': 1208925819614629174706176 is out of range; allowed: \[0, 4294967295\]"),
        ({"seed": 10**5000}, r"'seed': an integer of about 5001 digits is out of range; allowed: \[0, 4294967295\]"),
        ({"seed": -1}, r"'seed': -1 is out of range"),
        ({"model": {"width": 100_000}}, r"'model\.width': 100000 is out of range; allowed: \[1, 256\]"),
        ({"model": {"num_classes": 10**8}}, r"'model\.num_classes': 100000000 .*allowed: \[2, 100000\]"),
        ({"model": {"reduction": 2**70}}, r"'model\.reduction'.*allowed: \[1, 2048\]"),
        ({"train": {"batch_size": 2**63}}, r"'train\.batch_size'.*allowed: \[1, 1000000\]"),
        ({"server": {"rounds": 2**64}}, r"'server\.rounds'.*allowed: \[1, 1000000\]"),
        ({"partition": {"classes_per_client": 2**64}}, r"'partition\.classes_per_client'.*allowed: \[1, 100000\]"),
        ({"evaluate": {"pooled_max_samples": 2**64}}, r"'evaluate\.pooled_max_samples'.*\[1, 1000000000\]"),
    ],
)
def test_integers_are_bounded_to_what_numpy_and_torch_take(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(raw)


def test_the_largest_seed_builds_every_derived_seed():
    import numpy as np
    import torch

    cfg = config_from_dict({"seed": 2**32 - 1})
    torch.Generator().manual_seed(cfg.seed * 100_003 + 99_999 * 1_009 + 1_000_000)  # a client's seed
    np.random.default_rng(cfg.seed)
