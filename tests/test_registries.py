"""Every set of names the config accepts is exactly its registry's: one test over every pair."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from fedse import config, models, policies
from fedse.data import feature_skew, partition
from fedse.data import readers as data
from fedse.federation import strategy


def _allowed(section: type, key: str) -> set:
    tp = typing.get_type_hints(section)[key]
    while typing.get_origin(tp) is not typing.Literal:  # unwrap Optional[...] and tuple[..., ...]
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return set(typing.get_args(tp))


PAIRS = [
    (config.DataConfig, "dataset", data.DATASETS),
    (config.PartitionConfig, "scheme", partition.PARTITIONERS),
    (config.PartitionConfig, "feature_skew", feature_skew.STYLE_KINDS),
    (config.ModelConfig, "name", models.MODELS),
    (config.ModelConfig, "norm", models.NORMS),
    (config.PersonalizationConfig, "label_prior", policies.LABEL_PRIOR_MODES),
    (config.ServerConfig, "strategy", strategy.STRATEGIES),
]


@pytest.mark.parametrize("section,key,registry", PAIRS, ids=[f"{s.__name__}.{k}" for s, k, _ in PAIRS])
def test_config_names_are_the_registry_names(section, key, registry):
    assert _allowed(section, key) == set(registry)


def test_every_literal_of_the_config_is_tied_to_a_registry_or_listed_here():
    # A new Literal key must join PAIRS, or be a plain choice the code branches on (listed here).
    plain = {("PrivacyConfig", "mode"), ("PrivacyConfig", "accountant"), ("PrivacyConfig", "clipping")}
    plain.add(("ServerConfig", "norm_action"))
    literals = set()
    for cls in typing.get_type_hints(config.Config).values():
        if not dataclasses.is_dataclass(cls):
            continue
        for key, tp in typing.get_type_hints(cls).items():
            if "Literal" in str(tp):
                literals.add((cls.__name__, key))
    assert literals == {(s.__name__, k) for s, k, _ in PAIRS} | plain


def test_the_policy_is_a_registry_name_checked_by_the_registry():
    # The config takes any string; resolve() names the bad one and lists every registered name.
    cfg = config.config_from_dict({"personalization": {"policy": "fedcp"}})
    with pytest.raises(config.ConfigError, match="'personalization.policy': 'fedcp' is not a policy; allowed: apfl, "):
        policies.resolve(cfg)
