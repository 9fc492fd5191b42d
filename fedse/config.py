"""Typed configuration: YAML -> frozen dataclass tree, validated on the way in.

The defaults of every fedse setting live here and only here; the files in
``configs/`` hold what differs. (Flower's own run config, the few keys
``flwr run`` passes to the ServerApp, has its defaults in ``pyproject.toml``.)
Every error names the key, the bad value and what is allowed. Command-line
overrides (``--set partition.alpha=0.1``) are parsed as YAML scalars and go
through the same validation as the file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, Literal

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvaluateConfig",
    "ModelConfig",
    "OutputConfig",
    "PartitionConfig",
    "PersonalizationConfig",
    "PrivacyConfig",
    "ServerConfig",
    "SimulationConfig",
    "TrainConfig",
    "CONFIG_SCHEMA",
    "MAX_CLASSES",
    "MAX_CLIENTS",
    "RECORD",
    "SEED_MAX",
    "choice_error",
    "config_from_dict",
    "config_from_record",
    "config_to_dict",
    "config_to_record",
    "field_range",
    "load_config",
    "parse_overrides",
    "short_repr",
]


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


SHOWN_CHARACTERS = 200  # an error echoes at most this much of a value it was given


def short_repr(value: Any, limit: int = SHOWN_CHARACTERS) -> str:
    """``repr(value)`` cut to ``limit`` characters, with the full length after the cut: an error message
    echoes what it was given, never megabytes of it. An integer too long to print is described."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    try:
        return _cut(repr(value), limit)
    except (ValueError, RecursionError):  # an integer past Python's 4300-digit limit, a nesting too deep
        return f"a {type(value).__name__} too large to show"


def _cut(text: str, limit: int = SHOWN_CHARACTERS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _one_line(err: Exception) -> str:
    return _cut(" ".join(str(err).split()), 4 * SHOWN_CHARACTERS)


# What a YAML text may expand to. PyYAML builds an alias (*name) as a second reference to its anchor's value, so
# a few hundred bytes of nested aliases ("billion laughs") name 10**9 values: harmless until something walks
# them (an error message printing the value, a copy, a check of every element). A fedse config holds a few
# hundred values in three levels (section, key, list); the bounds leave room for data.classes of 100,000 names.
MAX_CONFIG_BYTES = 4 << 20
MAX_YAML_VALUES = 250_000  # every alias expanded
MAX_YAML_DEPTH = 32
MAX_YAML_INT_CHARACTERS = 30  # every fedse integer fits in 20 digits; Python refuses to parse beyond 4300


class _Refused(yaml.MarkedYAMLError):
    """A YAML text past one of the bounds above (reported with its line and column)."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader within bounds: nesting depth and the number of values with every alias expanded
    are measured while the document is composed (before anything is built from it), and integer literals
    are limited in length."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._shape: dict[int, tuple[int, int]] = {}  # id(node) -> (values with aliases expanded, depth)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        mark = self.peek_event().start_mark
        alias = self.check_event(yaml.AliasEvent)
        if self._depth >= MAX_YAML_DEPTH:
            raise _Refused(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if alias:
            if id(node) not in self._shape:
                raise _Refused(None, None, "an alias (*name) inside the value it names (a recursive value)", mark)
            size, depth = self._shape[id(node)]
        else:
            if isinstance(node, yaml.MappingNode):
                children = [child for pair in node.value for child in pair]
            else:
                children = node.value if isinstance(node, yaml.SequenceNode) else []
            size = 1 + sum(self._shape[id(c)][0] for c in children)
            depth = 1 + max((self._shape[id(c)][1] for c in children), default=0)
            self._shape[id(node)] = (size, depth)
        if self._depth + depth > MAX_YAML_DEPTH:
            raise _Refused(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels once aliases are expanded", mark)
        if size > MAX_YAML_VALUES:
            raise _Refused(None, None, f"more than {MAX_YAML_VALUES} values (every alias *name expanded)", mark)
        return node

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        if len(node.value) > MAX_YAML_INT_CHARACTERS:
            raise _Refused(None, None, f"an integer of {len(node.value)} characters", node.start_mark)
        return super().construct_yaml_int(node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)

_YAML_LIMITS = (
    f"allowed: YAML of at most {MAX_YAML_DEPTH} levels and {MAX_YAML_VALUES} values with every alias (*name) "
    f"expanded, integers of at most {MAX_YAML_INT_CHARACTERS} characters"
)


def _load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` within the bounds of :class:`_BoundedLoader` (a :class:`_Refused` past them);
    ``where`` names the text in the line and column of an error."""
    loader = _BoundedLoader(text)
    loader.name = where
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict[str, Any]:
    return {"range": (lo, hi, lo_open)}


# An integer setting that becomes a seed, a size or a count in numpy, torch or a Flower record has an upper
# bound: their integers are 64-bit, so 2**80 would pass a bound of "at least 1" and fail deep inside.
# Seeds: the clients' and partitions' seeds derived from it (seed x 100,003 + client x 1,009 + round) stay
# far below 2**64, the most torch.Generator.manual_seed takes; numpy's legacy seeding takes 2**32 - 1.
SEED_MAX = 2**32 - 1
MAX_CLIENTS = 100_000
MAX_CLASSES = 100_000
# A model's first-stage width: 4x the ImageNet-style default (se_resnet34 at 256 holds 343 M parameters).
MAX_WIDTH = 256
MAX_SAMPLES = 10**9  # sample counts
MAX_STEPS = 1_000_000  # rounds, epochs, the batch size


@dataclass(frozen=True)
class DataConfig:
    # A name of fedse.data.DATASETS (the registry checks it: fedse.spec.resolve).
    dataset: str = "digits"
    # Directory holding the dataset files (None: $FEDSE_DATA, then the standard places).
    root: str | None = None
    # Fetch the official files when missing (needs a network).
    download: bool = False
    # Random crop on training batches, and a horizontal flip where hflip allows it.
    augment: bool = False
    # Whether the augmentation mirrors images left-right (null: the dataset's own rule, fedse.data.readers.DATASETS:
    # CIFAR-10 yes; digits, MNIST, Fashion-MNIST and image folders no).
    hflip: bool | None = None
    # Class names in label order. The named datasets have their own; for 'imagefolder' a client
    # reading its own data maps its class folders onto these (a folder not listed is an error, a
    # missing one leaves its label unused), so every client numbers the classes alike.
    classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PartitionConfig:
    # 'dirichlet' splits each class across clients (global form: redrawn until min_size holds, which
    # fails at hundreds of clients); 'dirichlet-client' draws each client's own label mix and size
    # (per-client form: min_size holds by construction, seconds at 10,000 clients).
    # 'file' imports a split made elsewhere (PFLlib's folders, an index file: docs/data.md#bring-your-own-split).
    # (a name of fedse.data.partition.PARTITIONERS, or 'file')
    scheme: str = "dirichlet"
    num_clients: int = field(default=10, metadata=_range(1, MAX_CLIENTS))
    # Dirichlet concentration for label ('dirichlet', 'dirichlet-client') or size ('quantity') skew;
    # smaller = more skewed.
    alpha: float = field(default=0.5, metadata=_range(0, None, lo_open=True))
    # Classes per client for 'pathological'.
    classes_per_client: int = field(default=2, metadata=_range(1, MAX_CLASSES))
    # Every client gets at least this many samples (train + test): 'dirichlet' and 'quantity' redraw
    # until it holds, 'dirichlet-client' gives it to every client first.
    min_size: int = field(default=10, metadata=_range(1, MAX_SAMPLES))
    # Spread of client sizes under 'dirichlet-client': the samples above min_size are shared by
    # log-normal(0, size_sigma) weights (FedDyn's unbalanced setting uses 0.3), so real federations'
    # few large and many small clients can be modelled; 0 = equal sizes.
    size_sigma: float = field(default=0.0, metadata=_range(0, None))
    # Under 'dirichlet-client': every client's mean size, the clients sharing num_clients x this many
    # samples and the rest of the dataset left out (cross-device: a client holds as much at 10,000
    # clients as at 100); 0 = share the whole dataset.
    samples_per_client: int = field(default=0, metadata=_range(0, MAX_SAMPLES))
    # Share of each client's data held out as its own test part (same label distribution).
    test_fraction: float = field(default=0.25, metadata=_range(0, 1, lo_open=True))
    # Feature skew: each client's images pass through its own fixed transformation.
    # (names of fedse.data.feature_skew.STYLE_KINDS)
    feature_skew: tuple[str, ...] = ()
    feature_skew_strength: float = field(default=0.5, metadata=_range(0, 1, lo_open=True))
    # Under scheme 'file': the split to import, a PFLlib dataset folder (config.json, train/<k>.npz,
    # test/<k>.npz: each client's own images) or an index file (.json or .npz: each client's train and
    # test indices into data.dataset). Every client's train and test part is the file's, as it is
    # (test_fraction does not apply). A relative path is taken from the working directory.
    split: str | None = None
    # Under scheme 'file': the SHA-256 of the split's content (fedse.data.split_import.split_digest,
    # the same for the same split in any format). The split must have it, in every process that reads
    # it. null: not checked; fedse simulate and fedse compare set it (and make split an absolute path)
    # when a run starts, so the run's record names the split it ran on: a resume, or a merge of
    # comparisons, on another split is refused.
    split_sha256: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    # (a name of fedse.models.MODELS)
    name: str = "se_resnet8"
    # Width of the first stage (None: 16 for CIFAR-style, 64 for ImageNet-style).
    width: int | None = field(default=None, metadata=_range(1, MAX_WIDTH))
    # SE reduction ratio r: excitation hidden width h = C / r (rounded, at least 4).
    reduction: int = field(default=16, metadata=_range(1, 8 * MAX_WIDTH))
    # groupnorm is required for sample-level DP (Opacus). (a name of fedse.models.NORMS)
    norm: str = "batchnorm"
    # The model's input and output shape. None: implied by data.dataset (digits 1x8x8, MNIST and
    # Fashion-MNIST 1x28x28, CIFAR-10 3x32x32, 10 classes; imagefolder: len(data.classes) classes,
    # channels and size must be given). A deployed server builds the model from these alone: it
    # holds no data. A client whose data has another shape refuses to train.
    num_classes: int | None = field(default=None, metadata=_range(2, MAX_CLASSES))
    in_channels: int | None = field(default=None, metadata=_range(1, 4))
    image_size: int | None = field(default=None, metadata=_range(4, 1024))


@dataclass(frozen=True)
class PersonalizationConfig:
    # Which parts stay on the client and how they train. Default fedse-la: excitation private,
    # logits offset by the client's own label prior (docs/results.md).
    # (a name of fedse.policies.POLICIES: the registry checks it, fedse.policies.resolve)
    policy: str = "fedse-la"
    # Epochs of local fine-tuning before evaluation (policy fedavg-ft) and of cold-start adaptation.
    finetune_epochs: int = field(default=1, metadata=_range(1, MAX_STEPS))
    # Ditto's lambda: the personal model's pull toward the received global model, lambda/2 ||v - w||^2
    # (Li et al. 2021 tune it in {0.01, 0.1, 1, 2}; 0 makes the personal model local-only training).
    ditto_lambda: float = field(default=0.1, metadata=_range(0, None))
    # FedALA's start phase: the first time a client learns its mixing weights it repeats the pass until
    # the standard deviation of the last 10 pass losses is below this (the paper's and PFLlib's 0.1;
    # at most 100 passes); 0: one pass, as in every later round (fedse/policies/fedala.py).
    ala_start_threshold: float = field(default=0.1, metadata=_range(0, None))
    # Offset logits by the client's own label prior (fedse.prior): 'train' (logit adjustment in training
    # and prediction), 'predict' (at prediction only, weight fitted on the client's train part), 'off';
    # null: the policy's own. Off under privacy.mode=sample.
    label_prior: Literal["off", "train", "predict"] | None = None
    # Pseudo-count added to every class when a client counts its label prior (1: add-one smoothing).
    # It shrinks a small client's prior toward uniform more than a large client's (docs/results.md:
    # 16 against 1 gained 1.4 points on the quickstart's small clients, 0.3 on Fashion-MNIST's).
    prior_smoothing: float = field(default=16.0, metadata=_range(0, None, lo_open=True))


@dataclass(frozen=True)
class TrainConfig:
    local_epochs: int = field(default=1, metadata=_range(1, MAX_STEPS))
    # Epochs the private part trains alone before the shared part (private-first policies: fedrep).
    private_epochs: int = field(default=1, metadata=_range(1, MAX_STEPS))
    batch_size: int = field(default=32, metadata=_range(1, MAX_STEPS))
    lr: float = field(default=0.05, metadata=_range(0, None, lo_open=True))
    momentum: float = field(default=0.9, metadata=_range(0, 1))
    weight_decay: float = field(default=5e-4, metadata=_range(0, None))
    # bfloat16 autocast for the forward pass and loss (mixed precision; meant for CUDA, where it saves
    # memory and time; on a CPU it runs but rarely helps). Weights and optimizer stay float32.
    # Not with privacy.mode=sample.
    bf16: bool = False
    # Learning-rate multiplier for the private part (null: the policy's own, 10 for the fedse family, else 1).
    private_lr_scale: float | None = field(default=None, metadata=_range(0, None, lo_open=True))


@dataclass(frozen=True)
class ServerConfig:
    # Flower strategy aggregating the shared keys (a name of fedse.federation.strategy.STRATEGIES:
    # fedavg, fedprox, fedadam, and Flower's robust aggregators fedtrimmedavg, fedmedian, krum,
    # multikrum, bulyan).
    strategy: str = "fedavg"
    rounds: int = field(default=20, metadata=_range(1, MAX_STEPS))
    fraction_train: float = field(default=1.0, metadata=_range(0, 1, lo_open=True))
    fraction_evaluate: float = field(default=1.0, metadata=_range(0, 1, lo_open=True))
    min_train_clients: int = field(default=2, metadata=_range(1, MAX_CLIENTS))
    min_evaluate_clients: int = field(default=2, metadata=_range(1, MAX_CLIENTS))
    # FedProx proximal term mu (strategy: fedprox).
    proximal_mu: float = field(default=0.01, metadata=_range(0, None))
    # FedAdam server learning rate eta (strategy: fedadam).
    server_lr: float = field(default=0.01, metadata=_range(0, None, lo_open=True))
    # Seconds to wait for client replies in one round.
    round_timeout: float = field(default=3600.0, metadata=_range(0, None, lo_open=True))
    # Seconds the server waits before round 1 for exactly partition.num_clients nodes to connect;
    # any other number stops the run with an error naming both (simulation nodes are there at once).
    join_timeout: float = field(default=60.0, metadata=_range(0, None))
    # Largest 'num-examples' the server accepts from one reply as its aggregation weight (null: the
    # largest train part of the run's own partition). A client's reported count is its weight in the
    # average, so one inflated count would let a single client outweigh all others.
    max_num_examples: int | None = field(default=None, metadata=_range(1, None))
    # fedtrimmedavg: the fraction of values trimmed at each end, per coordinate.
    trim_beta: float = field(default=0.2, metadata=_range(0, 0.49))
    # krum, multikrum, bulyan: the malicious clients per round they tolerate.
    byzantine: int = field(default=1, metadata=_range(0, None))
    # multikrum: the updates it averages (null: the clients per round less byzantine).
    krum_select: int | None = field(default=None, metadata=_range(1, None))
    # Each update's L2 norm is bounded by this multiple of the round's median update norm; beyond it
    # the update is clipped to the bound or dropped (norm_action). null: 3 on a deployed server (no
    # data, strangers' replies), no bound in simulation or under client-level DP (whose own clipping
    # bounds every update); 0: no bound anywhere.
    norm_bound: float | None = field(default=None, metadata=_range(0, None))
    norm_action: Literal["clip", "drop"] = "clip"
    # A reply's num-examples weight is capped at this multiple of the round's median claim. null: 2 on
    # a deployed server, no cap in simulation; 0: no cap anywhere.
    weight_cap: float | None = field(default=None, metadata=_range(0, None))
    # A deployed server's key list: a file of 'SHA256:<fingerprint> <client number>' lines (ssh-keygen
    # -lf KEY.pub prints the fingerprint). Each node is bound to the client its registered key is
    # listed with; a node whose key is not listed, or that claims another number, is refused. null:
    # a node keeps the number it claims first. Simulated nodes have no keys: refused there.
    client_keys: str | None = None


@dataclass(frozen=True)
class EvaluateConfig:
    # Evaluate every client on the pooled test set of all clients (needs the run's dataset on each
    # client: simulation and partition demos; false for clients with their own data-dir).
    pooled: bool = True
    # ... every N rounds (0: last round only).
    pooled_every: int = field(default=0, metadata=_range(0, MAX_STEPS))
    # Cap on the pooled test set (stratified by client, seeded); keeps evaluation cheap.
    pooled_max_samples: int = field(default=2000, metadata=_range(1, MAX_SAMPLES))
    # Clients report a CRC32 of their private state before and after each round (reveals
    # no weights; lets a run verify that private state persists across rounds).
    private_digest: bool = False
    # Whose evaluation protocol: 'fedse' evaluates what each method keeps as it stands (FedALA: the
    # received head mixed with the W learnt before the client's last training); 'pfllib' evaluates as
    # PFLlib and the FedALA paper do (FedALA: W learnt on the model just received, then that mix).
    protocol: Literal["fedse", "pfllib"] = "fedse"


@dataclass(frozen=True)
class SimulationConfig:
    # CPU cores reserved per virtual client (Ray resources); also torch threads per client.
    client_cpus: float = field(default=1.0, metadata=_range(0, None, lo_open=True))
    # Share of one GPU per virtual client (Ray places the client on a GPU and shows it only that
    # one); 0: the client runs on the CPU, CUDA hidden from it. Used where the cluster has GPUs.
    client_gpu_fraction: float = field(default=0.0, metadata=_range(0, 1))
    # An existing Ray cluster to run on ("ray://HOST:10001" or "HOST:6379" or "auto": started with
    # `ray start --head`); null: a local one, started and stopped by the run.
    ray_address: str | None = None


@dataclass(frozen=True)
class PrivacyConfig:
    # none | sample (Opacus DP-SGD on every client) | client (Flower's DP wrappers on the server).
    mode: Literal["none", "sample", "client"] = "none"
    # Gaussian noise multiplier sigma; or leave null and set target_epsilon for the whole run.
    # Open at 0: a zero-noise "DP" run has infinite epsilon, so it would report a guarantee it lacks.
    noise_multiplier: float | None = field(default=None, metadata=_range(0, None, lo_open=True))
    # Epsilon to reach after server.rounds rounds (sigma is derived from it); exclusive with noise_multiplier.
    target_epsilon: float | None = field(default=None, metadata=_range(0, None, lo_open=True))
    delta: float = field(default=1e-5, metadata=_range(0, 1, lo_open=True))
    # sample: per-sample gradient clipping bound (L2 over every trained parameter).
    max_grad_norm: float = field(default=1.0, metadata=_range(0, None, lo_open=True))
    accountant: Literal["rdp", "prv"] = "rdp"
    # client: clipping of each client's update to the shared weights (fixed bound, or adaptive from it).
    clipping: Literal["fixed", "adaptive"] = "fixed"
    clipping_norm: float = field(default=1.0, metadata=_range(0, None, lo_open=True))
    # adaptive clipping: noise std of the clipped-count query (null: Flower's default, sampled clients / 20).
    clipped_count_stddev: float | None = field(default=None, metadata=_range(0, None, lo_open=True))
    # sample: draw DP-SGD noise from Opacus's cryptographically secure generator (needs torchcsprng).
    # Off, noise comes from a torch generator seeded from os.urandom: unpredictable from the config,
    # but not a CSPRNG, and without secure mode's guard against floating-point attacks on the noise
    # (Mironov 2012). Accepted only where torchcsprng imports, so true is never silently ignored.
    secure_mode: bool = False


@dataclass(frozen=True)
class OutputConfig:
    # Parent directory of run folders.
    dir: str = "runs"
    # Run folder name (None: <config name>-<timestamp>): one plain folder name, so the run folder is
    # always a direct child of output.dir ('../x', 'a/b' or an absolute path would write elsewhere).
    name: str | None = None
    # At the end of a run every client writes its personalized model (fedse.personal): in simulation
    # into the run folder's clients/, a deployed client with a state-dir into that directory. A client
    # not evaluated in the last round is asked once more after it, with the final shared weights.
    client_models: bool = True
    # TensorBoard event files in the run folder (tensorboard/): every figure of the round line per
    # round, the configuration and the final tables (fedse.analysis.tracking; needs fedse[tensorboard]).
    tensorboard: bool = False


@dataclass(frozen=True)
class Config:
    seed: int = field(default=0, metadata=_range(0, SEED_MAX))
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    personalization: PersonalizationConfig = PersonalizationConfig()
    train: TrainConfig = TrainConfig()
    server: ServerConfig = ServerConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    simulation: SimulationConfig = SimulationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    output: OutputConfig = OutputConfig()


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of ({_type_name(typing.get_args(tp)[0])})"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def choice_error(key: str, value: Any, allowed: Iterable[str]) -> ConfigError:
    """The error for a name no registry holds: the key, the value, and every name allowed."""
    names = ", ".join(repr(a) for a in allowed)
    return ConfigError(f"config key '{key}': got {short_repr(value)} ({type(value).__name__}); allowed: one of {names}")


class _BadValue(ConfigError):
    """The value has the right type but can never be valid (NaN, inf, a NUL byte): reported as is,
    not as a type mismatch, even where the key's type is a union."""


_NO = object()  # what a coercer returns for a value that is not of its type


def _as_float(value: Any, key: str) -> Any:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return _NO
    # NaN passes every range check (all comparisons are false) and inf passes open-ended ones; neither
    # is a usable learning rate, concentration or bound. (A huge YAML int overflows float().)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _BadValue(f"config key '{key}': got {short_repr(value)}; allowed: a finite number (not nan or inf)")
    return number


def _as_str(value: Any, key: str) -> Any:
    if not isinstance(value, str):
        return _NO
    if "\x00" in value:  # no path, name or label may hold one; os calls raise ValueError on it
        raise _BadValue(
            f"config key '{key}': got {short_repr(value)}, which holds a NUL character; allowed: a string without NUL"
        )
    return value


_SCALARS: dict[Any, Any] = {
    type(None): lambda value, key: None if value is None else _NO,
    bool: lambda value, key: value if isinstance(value, bool) else _NO,
    int: lambda value, key: value if isinstance(value, int) and not isinstance(value, bool) else _NO,
    float: _as_float,
    str: _as_str,
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    got: Any = _NO
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except _BadValue:
                raise
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str | int):
            got = value
    elif origin is tuple:
        if isinstance(value, list | tuple):
            got = tuple(_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value))
    elif tp in _SCALARS:
        got = _SCALARS[tp](value, key)
    if got is not _NO:
        return got
    raise ConfigError(
        f"config key '{key}': got {short_repr(value)} ({type(value).__name__}); allowed: {_type_name(tp)}"
    )


def field_range(section: type, name: str) -> tuple[float | None, float | None]:
    """(lowest, highest) a setting allows (None: unbounded), for code that checks the same quantity read
    from elsewhere (a model file's header) against the same bounds."""
    lo, hi, _ = next(f for f in dataclasses.fields(section) if f.name == name).metadata["range"]
    return lo, hi


def _check_range(value: Any, meta: dict[str, Any], key: str) -> None:
    if "range" not in meta or value is None:
        return
    lo, hi, lo_open = meta["range"]
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and value > hi
    if too_low or too_high:
        left = "(" if lo_open else "["
        bounds = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ConfigError(f"config key '{key}': {short_repr(value)} is out of range; allowed: {bounds}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}': expected a mapping, got {short_repr(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)  # key=str: YAML keys may be numbers
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{prefix + '.' if prefix else ''}{_cut(str(unknown[0]))}' in {where}; "
            f"allowed keys: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
            _check_range(kwargs[name], dict(fields[name].metadata), key)
    return cls(**kwargs)


def _check_output_name(name: str | None) -> None:
    """output.name must name one folder directly inside output.dir."""
    if name is None:
        return
    if (
        name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or name != name.strip()
        or not name.isprintable()
        or Path(name).is_absolute()
        or PureWindowsPath(name).drive
    ):
        raise ConfigError(
            f"config key 'output.name': {short_repr(name)} is not a plain folder name; allowed: one folder "
            "name (the run folder is output.dir/<name>) without '/' or '\\', not '.' or '..', "
            "not empty, no control characters or leading/trailing spaces; or null for "
            "<config>-<timestamp>"
        )


def _check_cross(cfg: Config) -> None:
    """Rules between keys that are numbers and names alone; what a registry's names mean (datasets,
    partitions, models, strategies, privacy, policies) each registry checks (fedse.spec.resolve)."""
    _check_output_name(cfg.output.name)
    p, s = cfg.partition, cfg.server
    if s.min_train_clients > p.num_clients:
        raise ConfigError(
            f"config key 'server.min_train_clients': {s.min_train_clients} exceeds "
            f"partition.num_clients={p.num_clients}; allowed: at most the number of clients"
        )
    if s.min_evaluate_clients > p.num_clients:
        raise ConfigError(
            f"config key 'server.min_evaluate_clients': {s.min_evaluate_clients} exceeds "
            f"partition.num_clients={p.num_clients}; allowed: at most the number of clients"
        )


def config_from_dict(raw: dict[str, Any] | None) -> Config:
    """Validate a plain mapping (keys may be omitted: defaults fill them)."""
    cfg = _build(Config, raw or {}, "")
    _check_cross(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain, JSON/YAML-serialisable mapping (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# A configuration written down with a run (checkpoint, run folder, comparison) is a *record*: it carries
# the schema it was written under, so that reading it later never mistakes a key it lacks for today's
# default. Each schema names the settings whose meaning changed for a record that lacks them: the value
# every run before that schema ran with. Bump CONFIG_SCHEMA when a default changes or a key is added
# whose absence meant something else, and say here what an older record meant.
CONFIG_SCHEMA = 3
_BEFORE: dict[int, dict[str, Any]] = {
    # 2: the counted label prior's pseudo-count became a setting, 16 by default; before, add-one.
    2: {"personalization.prior_smoothing": 1.0},
    # 3: data.hflip; before, the augmentation mirrored colour images and no others. That is every
    # dataset's own rule (null) except for an image folder of colour images: _check_old_flip.
    3: {"data.hflip": None},
}

RECORD = "config.yaml"  # the file a run folder keeps its record in: what --resume, predict, adapt and monitor read


def config_to_record(cfg: Config) -> dict[str, Any]:
    """The configuration as written down with a run: every key, and the schema it was written under."""
    return {"schema": CONFIG_SCHEMA, **config_to_dict(cfg)}


def config_from_record(raw: Any) -> Config:
    """A configuration written down with a run, by this fedse or an older one: a key the record lacks
    takes the value runs of its schema had (``_BEFORE``), not today's default. A record without a
    schema predates schemas (1); one from a newer fedse is refused."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config record: expected a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    schema = raw.pop("schema", 1)
    if not isinstance(schema, int) or isinstance(schema, bool) or not 1 <= schema <= CONFIG_SCHEMA:
        raise ConfigError(
            f"config record key 'schema': {short_repr(schema)}; allowed: an integer in [1, {CONFIG_SCHEMA}] "
            "(a larger one was written by a newer fedse)"
        )
    raw = copy.deepcopy(raw)  # the back-fill below must not touch the caller's mapping
    for version in range(schema + 1, CONFIG_SCHEMA + 1):
        for dotted, value in _BEFORE.get(version, {}).items():
            *sections, key = dotted.split(".")
            node = raw
            for section in sections:
                node = node.setdefault(section, {})
                if not isinstance(node, dict):
                    break
            else:
                node.setdefault(key, value)
    if schema < 3:
        _check_old_flip(raw)
    return config_from_dict(raw)


def _check_old_flip(raw: dict[str, Any]) -> None:
    """A record from before data.hflip of an augmented image folder: its colour images were mirrored,
    its grey ones not, and the record does not say which it had."""
    data = raw.get("data")
    if (
        isinstance(data, dict)
        and data.get("dataset") == "imagefolder"
        and data.get("augment")
        and data["hflip"] is None
    ):
        raise ConfigError(
            "config record key 'data.hflip': missing from a record written before it existed, of an augmented "
            "image folder (whose colour images were mirrored then, grey ones not); allowed: --set data.hflip=true "
            "for colour images, --set data.hflip=false for grey ones"
        )


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["train.lr=0.1", "partition.feature_skew=[rotation]"]`` -> nested mapping."""
    raw: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        shown = short_repr(item)
        if not sep or not key.strip():
            raise ConfigError(f"override {shown} must look like section.key=value (e.g. partition.alpha=0.1)")
        try:
            value = _load_yaml(text, "the value") if text.strip() else None
        except _Refused as err:
            raise ConfigError(f"override {shown}: value refused ({_one_line(err)}); {_YAML_LIMITS}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {shown}: value is not valid YAML ({_one_line(err)})") from None
        _set_path(raw, key.strip(), value)
    return raw


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *, record: bool = False
) -> Config:
    """Defaults <- YAML file (if any) <- ``--set`` overrides, validated once.

    A file with a top-level ``schema`` is a run's record (a run folder's ``config.yaml``) and is read as
    one (:func:`config_from_record`); so is any file when ``record`` is set, where a file without
    ``schema`` predates schemas. A file a user wrote has no ``schema``: what it omits is today's default."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(
                f"config file {short_repr(str(path))} is a directory; allowed: a YAML file (see configs/ for examples)"
            )
        if not path.is_file():
            raise ConfigError(f"config file {short_repr(str(path))} does not exist (see configs/ for examples)")
        name = short_repr(str(path))
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_CONFIG_BYTES + 1)  # what the file says of its size may change
            if len(data) > MAX_CONFIG_BYTES:
                raise ConfigError(
                    f"config file {name} is larger than {MAX_CONFIG_BYTES} bytes; allowed: at most that "
                    "(a fedse config is a few kB)"
                )
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {name} cannot be read as UTF-8 text: {_one_line(err)}") from None
        try:
            raw = _load_yaml(text, "the file") or {}
        except _Refused as err:
            raise ConfigError(f"config file {name} is refused: {_one_line(err)}; {_YAML_LIMITS}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {name} is not valid YAML: {_one_line(err)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {name} must hold a mapping of sections, got {type(raw).__name__}")
    if record or "schema" in raw:
        return config_from_record(_merge(raw, parse_overrides(overrides)))
    return config_from_dict(_merge(raw, parse_overrides(overrides)))
