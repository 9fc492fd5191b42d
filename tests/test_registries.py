"""Every set of names the config accepts is exactly its registry's: one test over every pair."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from fedse import config, models, policies, spec
from fedse.data import feature_skew, partition
from fedse.data import readers as data
from fedse.federation import strategy


def _allowed(section: type, key: str) -> set:
    tp = typing.get_type_hints(section)[key]
    while typing.get_origin(tp) is not typing.Literal:  # unwrap Optional[...] and tuple[..., ...]
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return set(typing.get_args(tp))


PAIRS = [
    (config.PersonalizationConfig, "label_prior", policies.LABEL_PRIOR_MODES),
]


@pytest.mark.parametrize("section,key,registry", PAIRS, ids=[f"{s.__name__}.{k}" for s, k, _ in PAIRS])
def test_config_names_are_the_registry_names(section, key, registry):
    assert _allowed(section, key) == set(registry)


def test_every_literal_of_the_config_is_tied_to_a_registry_or_listed_here():
    # A new Literal key must join PAIRS, or be a plain choice the code branches on (listed here).
    plain = {("PrivacyConfig", "mode"), ("PrivacyConfig", "accountant"), ("PrivacyConfig", "clipping")}
    plain.add(("ServerConfig", "norm_action"))
    plain.add(("EvaluateConfig", "protocol"))
    literals = set()
    for cls in typing.get_type_hints(config.Config).values():
        if not dataclasses.is_dataclass(cls):
            continue
        for key, tp in typing.get_type_hints(cls).items():
            if "Literal" in str(tp):
                literals.add((cls.__name__, key))
    assert literals == {(s.__name__, k) for s, k, _ in PAIRS} | plain


# Each registry owns its names: the config takes any string, and the registry's check (run by
# fedse.spec.resolve before anything starts) names the bad value and every registered name.
OWNED = [
    ({"data": {"dataset": "svhn"}}, "data.dataset", data.DATASETS),
    ({"partition": {"scheme": "shards"}}, "partition.scheme", partition.PARTITIONERS),
    ({"partition": {"feature_skew": ["blur"]}}, "partition.feature_skew[0]", feature_skew.STYLE_KINDS),
    ({"model": {"name": "vit"}}, "model.name", models.MODELS),
    ({"model": {"norm": "layernorm"}}, "model.norm", models.NORMS),
    ({"server": {"strategy": "fedyogi"}}, "server.strategy", strategy.STRATEGIES),
    ({"personalization": {"policy": "fedcp"}}, "personalization.policy", policies.POLICIES),
]


@pytest.mark.parametrize("raw,key,registry", OWNED, ids=[k for _, k, _ in OWNED])
def test_a_name_no_registry_holds_is_one_error_listing_the_registry(raw, key, registry):
    cfg = config.config_from_dict(raw)  # any string passes the config's own type check
    with pytest.raises(config.ConfigError) as err:
        spec.resolve(cfg)
    message = str(err.value)
    assert f"config key '{key}'" in message
    assert all(repr(name) in message or name in message for name in registry)


def test_every_registered_name_resolves():
    for raw in (
        *({"data": {"dataset": d, "root": "/nonexistent"}} for d in data.DATASETS),
        *({"partition": {"scheme": s}} for s in partition.PARTITIONERS if s != "dirichlet-client"),
        {"partition": {"feature_skew": list(feature_skew.STYLE_KINDS)}},
        *({"model": {"name": m}, "data": {"dataset": "mnist"}} for m in models.MODELS),
        *({"server": {"strategy": s, "byzantine": 0}} for s in strategy.STRATEGIES),
    ):
        spec.resolve(config.config_from_dict(raw))
