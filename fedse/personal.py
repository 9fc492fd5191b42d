"""A client's personalized model as a file: written by the client, loaded and used anywhere.

What a client evaluates is the shared weights it received plus its own private
tensors (plus, under ``fedavg-ft``, a fine-tuning of the whole model), its
normalisation, and the label-prior offset its policy predicts with. The client
writes exactly that, at the final evaluation of a run:

* in simulation, ``<run folder>/clients/client_<id>.fedse``: the private tensors
  (or the whole model where the policy changes shared keys at evaluation), with
  the CRC of the shared weights they go with; the final shared weights are the
  run folder's ``shared_weights.pt``;
* on a deployed client with a ``state-dir``: ``<state-dir>/personalized.fedse``,
  the complete model.

Either way: :func:`fedse.state.write_tensor_file` (atomic; SHA-256 checked on
load; tensors read with ``torch.load(weights_only=True)``, so no pickled object is
ever run) with a JSON header: the policy, the model's configuration, classes,
normalisation, the prior (mode and weight; the offset itself is a tensor), the
rounds the shared and private parts come from, and the accuracy the client
measured with it on its own test part.

:func:`load_personalized` rebuilds the model from such a file and returns a
:class:`PersonalizedModel`, whose :meth:`~PersonalizedModel.predict` applies the
normalisation and the offset.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import MAX_CLASSES, MAX_CLIENTS, RECORD, Config, ModelConfig, field_range, load_config, short_repr
from .data.federated import ClientShard, model_shape, own_data
from .fingerprint import GateStats, probe
from .io import atomic_write_text, csv_cell
from .models import MODELS, NORMS, SEBlock, build_model, create_model
from .policies import ClientRun, Policy, resolve
from .prior import label_log_prior
from .state import StateCorruptError, digest, read_tensor_file, write_tensor_file
from .train import EvalResult, default_device, evaluate, predict

__all__ = [
    "CLIENTS_DIR",
    "MODEL_FILE",
    "PersonalizedModel",
    "adapt_new_client",
    "client_model_path",
    "client_models",
    "export_model",
    "fit_gates",
    "load_personalized",
    "predict_csv",
    "write_personalized",
]

MAGIC = b"FEDSE-MODEL\n"
CLIENTS_DIR = "clients"
MODEL_FILE = "personalized.fedse"  # in a deployed client's state dir
SHARED_FILE = "shared_weights.pt"  # in a run folder (fedse.analysis.report.write_run)
_MODEL_KEYS = ("name", "width", "reduction", "norm")


def client_model_path(run_dir: str | Path, client: int) -> Path:
    return Path(run_dir) / CLIENTS_DIR / f"client_{client:05d}.fedse"


def write_personalized(
    path: str | Path,
    *,
    model: nn.Module,
    keys: list[str] | None,
    shared: Mapping[str, torch.Tensor],
    offset: torch.Tensor | None,
    header: Mapping[str, Any],
    gates: GateStats | None = None,
) -> None:
    """Write ``model``'s tensors (``keys``; None: all), the prior ``offset`` and the client's gate
    statistics to ``path``. ``shared``: the shared weights the model was built from (their CRC goes
    in the header, so a private-only file is loaded only with the shared weights it belongs to)."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    chosen = state if keys is None else {k: state[k] for k in keys}
    tensors = {f"model.{k}": v for k, v in chosen.items()}
    if offset is not None:
        tensors["prior.offset"] = offset.detach().float().cpu()
    if gates is not None:
        tensors |= {f"gates.{k}": v for k, v in gates.to_state().items()}
    meta = {**header, "complete": keys is None, "shared_crc": digest(dict(shared))}
    write_tensor_file(path, MAGIC, tensors, meta)


@dataclass
class PersonalizedModel:
    """A client's model, ready to use: ``predict`` gives class probabilities of uint8 images."""

    model: nn.Module
    header: dict[str, Any]
    offset: torch.Tensor | None
    gates: GateStats | None = None  # the client's gate fingerprint (its train part), where written

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.header["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.header["std"])

    @property
    def classes(self) -> list[str]:
        return list(self.header["classes"])

    def logits(self, images: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Logits of uint8 images (N, C, H, W), with the client's prior offset added."""
        self._check_images(images)
        out = predict(self.model, images, mean=self.mean, std=self.std, device=device or default_device())
        return out if self.offset is None else out + self.offset

    def predict(self, images: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Class probabilities (N, classes)."""
        return F.softmax(self.logits(images, device), dim=1)

    def gate_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Per image, how far its SE gates are from this client's own (diagonal Mahalanobis, mean
        over channels; :mod:`fedse.fingerprint`). Above ``header["gate_threshold"]["value"]``: unusual
        for this client, at the false-alarm rate the threshold was set for on its held-out data."""
        if self.gates is None:
            raise ValueError("this model file holds no gate statistics (a model without SE blocks)")
        self._check_images(images)
        return self.gates.score(probe(self.model, images, mean=self.mean, std=self.std).gates)

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> EvalResult:
        """Accuracy and loss as the client measured them (the same evaluation loop and offset)."""
        self._check_images(images)
        return evaluate(self.model, images, labels, mean=self.mean, std=self.std, logit_bias=self.offset)

    def _check_images(self, images: torch.Tensor) -> None:
        want = (self.header["in_channels"], self.header["image_size"], self.header["image_size"])
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"images must be uint8 (N, {want[0]}, {want[1]}, {want[2]}) for this model, "
                f"got {images.dtype} {tuple(images.shape)}"
            )


def client_models(run_dir: str | Path) -> list[int]:
    """The clients whose model file a run folder holds (``clients/client_NNNNN.fedse``), in order."""
    found = (re.fullmatch(r"client_(\d+)\.fedse", p.name) for p in (Path(run_dir) / CLIENTS_DIR).glob("*.fedse"))
    return sorted(int(m.group(1)) for m in found if m)


def _clients_held(run_dir: Path) -> str:
    """Which client numbers a run folder's models have, for a message."""
    held = client_models(run_dir)
    if not held:
        return f"but this one holds none: {CLIENTS_DIR}/ is empty or missing, as after output.client_models=false"
    if held == list(range(held[0], held[-1] + 1)):
        return f"N in {held[0]}..{held[-1]}"
    return f"N one of {short_repr(held)}"


def _resolve(path: Path, client: int | None) -> Path:
    if path.is_file():
        return path
    if (path / MODEL_FILE).is_file() and client is None:
        return path / MODEL_FILE
    if client is not None:
        found = client_model_path(path, client)
        if found.is_file():
            return found
        raise FileNotFoundError(
            f"no personalized model for client {client} in {path} (looked for {found}); {_clients_held(path)}"
        )
    if (path / RECORD).is_file():
        raise FileNotFoundError(
            f"{path} is a simulation run folder, which holds one model per client: pass --client N "
            f"({_clients_held(path)}; in Python, load_personalized(path, client=N))"
        )
    raise FileNotFoundError(
        f"{path} holds no personalized model: pass a .fedse file, a deployed client's state dir "
        f"(with {MODEL_FILE}) or a run folder with client=N"
    )


def _read_shared(path: Path) -> dict[str, torch.Tensor]:
    """A run folder's final shared weights: read with ``weights_only`` (no pickled object is run)
    and checked to be a mapping of tensors."""
    try:
        shared = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 (weights_only: tensors and plain data only)
        raise StateCorruptError(f"{path}: not a plain mapping of tensors ({type(err).__name__})") from None
    if not isinstance(shared, dict) or not all(isinstance(v, torch.Tensor) for v in shared.values()):
        raise StateCorruptError(f"{path}: not a mapping of tensors")
    return shared


def _is_int(value: Any, lo: float | None, hi: float | None) -> bool:
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def _is_finite(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past the largest float
        return False


def _check_header(file: Path, header: dict[str, Any], advice: str) -> None:
    """Every header field the model is built and used from, checked before anything is allocated: the
    SHA-256 proves the file whole, not that fedse wrote it, and a header may ask for a model of any size.
    The bounds are the configuration's own (a model no config can describe is no fedse model)."""

    def refuse(key: str, value: Any, allowed: str) -> StateCorruptError:
        return StateCorruptError(f"{file}: header '{key}' is {short_repr(value)}; allowed: {allowed}; {advice}")

    missing = {"model", "num_classes", "in_channels", "image_size", "mean", "std", "classes", "complete"} - set(header)
    if missing:
        raise StateCorruptError(f"{file}: header lacks {sorted(missing)}; {advice}")
    _check_model_spec(header["model"], refuse)
    shape = {"num_classes": (1, MAX_CLASSES), **{k: field_range(ModelConfig, k) for k in ("in_channels", "image_size")}}
    for key, (lo, hi) in shape.items():
        if not _is_int(header[key], lo, hi):
            raise refuse(key, header[key], f"an integer in [{lo}, {hi}]")
    channels, classes = header["in_channels"], header["num_classes"]
    for key in ("mean", "std"):
        value = header[key]
        if not (isinstance(value, list) and len(value) == channels and all(_is_finite(v) for v in value)):
            raise refuse(key, value, f"a list of {channels} finite numbers (one per channel)")
    if not all(v > 0 for v in header["std"]):
        raise refuse("std", header["std"], "positive numbers (images are divided by them)")
    names = header["classes"]
    if not (isinstance(names, list) and len(names) == classes and all(isinstance(c, str) for c in names)):
        raise refuse("classes", names, f"a list of {classes} names (header 'num_classes')")
    if not isinstance(header["complete"], bool):
        raise refuse("complete", header["complete"], "true or false")
    if header.get("client") is not None and not _is_int(header["client"], 0, MAX_CLIENTS - 1):
        raise refuse("client", header["client"], f"null or an integer in [0, {MAX_CLIENTS - 1}]")
    if "gate_threshold" in header:
        threshold = header["gate_threshold"]
        if not (isinstance(threshold, dict) and _is_finite(threshold.get("value"))):
            raise refuse("gate_threshold", threshold, "a mapping whose 'value' is a finite number")


def _check_model_spec(spec: Any, refuse: Callable[[str, Any, str], StateCorruptError]) -> None:
    """The header's ``model`` mapping: a registered model and norm, width and reduction in the config's
    bounds."""
    if not isinstance(spec, dict) or set(spec) != set(_MODEL_KEYS):
        raise refuse("model", spec, f"a mapping of exactly {list(_MODEL_KEYS)}")
    if not isinstance(spec["name"], str) or spec["name"] not in MODELS:
        raise refuse("model.name", spec["name"], f"one of {sorted(MODELS)}")
    if not isinstance(spec["norm"], str) or spec["norm"] not in NORMS:
        raise refuse("model.norm", spec["norm"], f"one of {list(NORMS)}")
    for key, lo in (("width", 1), ("reduction", 1)):
        _, hi = field_range(ModelConfig, key)
        if spec[key] is not None and not _is_int(spec[key], lo, hi):
            raise refuse(f"model.{key}", spec[key], f"an integer in [{lo}, {hi}] or null")


_GATE_BLOCK = re.compile(r"gates\.gate_(?:mean|var)\.(\d{1,9})")


def load_personalized(path: str | Path, client: int | None = None) -> PersonalizedModel:
    """Client ``client``'s model from a run folder, or the model in a ``.fedse`` file or a deployed
    client's state dir. The file's checksum, its header and every tensor's shape are checked; a
    private-only file is combined with the run folder's final shared weights, which must be the
    ones it was written with (their CRC). Errors: :class:`~fedse.state.StateCorruptError` or
    ValueError, naming the file and what is wrong."""
    file = _resolve(Path(path), client)
    advice = "re-export it from the run (or the client's state dir); this file cannot be used"
    tensors, header = read_tensor_file(file, MAGIC, "personalized-model", advice)
    _check_header(file, header, advice)
    spec = header["model"]
    try:
        model = create_model(
            spec["name"],
            num_classes=header["num_classes"],
            in_channels=header["in_channels"],
            width=spec["width"],
            reduction=spec["reduction"],
            norm=spec["norm"],
            image_size=header["image_size"],
        )
    except (ValueError, TypeError, KeyError) as err:
        raise StateCorruptError(f"{file}: header describes no buildable model ({err}); {advice}") from None
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    if not header["complete"]:
        shared_path = file.parent.parent / SHARED_FILE
        if not shared_path.is_file():
            raise FileNotFoundError(
                f"{file} holds only the client's private part; its run folder's {SHARED_FILE} "
                f"({shared_path}) is missing"
            )
        shared = _read_shared(shared_path)
        if digest(shared) != header.get("shared_crc"):
            raise StateCorruptError(
                f"{shared_path} are not the shared weights {file} was written with (CRC mismatch): "
                "the run folder and the client file come from different runs or rounds"
            )
        state = {**shared, **state}
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        wrong = sorted(set(state) ^ set(expected))[:5] or [k for k in expected if state[k].shape != expected[k].shape]
        raise StateCorruptError(f"{file}: tensors do not fit the model its header describes ({wrong[:5]}); {advice}")
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise StateCorruptError(f"{file}: the model holds NaN or inf; {advice}")
    model.load_state_dict(state, strict=False)
    model.eval()
    offset = tensors.get("prior.offset")
    if offset is not None and (offset.shape != (header["num_classes"],) or not offset.is_floating_point()):
        raise StateCorruptError(
            f"{file}: prior offset of shape {tuple(offset.shape)} ({offset.dtype}); allowed: "
            f"{header['num_classes']} floating-point numbers (one per class); {advice}"
        )
    if offset is not None and not torch.isfinite(offset).all():
        raise StateCorruptError(
            f"{file}: prior offset {short_repr(offset.tolist())}; allowed: finite numbers (a NaN or inf offset "
            f"makes every probability NaN); {advice}"
        )
    gates = None
    if any(k.startswith("gates.") for k in tensors):
        blocks = sum(isinstance(m, SEBlock) for m in model.modules())
        for key in (k for k in tensors if k.startswith("gates.") and k != "gates.gate_count"):
            match = _GATE_BLOCK.fullmatch(key)
            if match is None or int(match.group(1)) >= blocks:  # before from_state lists every block up to it
                raise StateCorruptError(
                    f"{file}: gate statistics key {short_repr(key)}; allowed: gates.gate_mean.<b>, "
                    f"gates.gate_var.<b> for the model's {blocks} SE blocks (b < {blocks}), gates.gate_count; {advice}"
                )
        try:
            gates = GateStats.from_state({k.removeprefix("gates."): v for k, v in tensors.items() if k[:6] == "gates."})
        except ValueError as err:
            raise StateCorruptError(f"{file}: gate statistics: {err}; {advice}") from None
        widths = [m.channels for m in model.modules() if isinstance(m, SEBlock)]
        if [len(m) for m in gates.mean] != widths:
            raise StateCorruptError(f"{file}: gate statistics do not fit the model's SE blocks {widths}; {advice}")
    return PersonalizedModel(model, header, offset, gates)


def fit_gates(
    model: nn.Module,
    train_images: torch.Tensor,
    held_out: torch.Tensor,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    false_alarm: float = 0.05,
) -> tuple[GateStats, dict[str, float]] | None:
    """A client's gate fingerprint: statistics of its SE gates on its own train part, and the
    score threshold that flags ``false_alarm`` of its held-out images (None without SE blocks)."""
    from .fingerprint import threshold_at

    if not any(isinstance(m, SEBlock) for m in model.modules()) or len(train_images) < 2 or len(held_out) < 1:
        return None
    stats = GateStats.fit(probe(model, train_images, mean=mean, std=std).gates)
    scores = stats.score(probe(model, held_out, mean=mean, std=std).gates)
    return stats, {"false_alarm": false_alarm, "value": threshold_at(scores, false_alarm)}


def predict_csv(
    loaded: PersonalizedModel,
    images: torch.Tensor,
    names: list[str],
    out: str | Path,
    labels: torch.Tensor | None = None,
) -> float | None:
    """Score ``images`` with ``loaded``; write ``out`` (CSV, atomically): name, predicted class,
    then one probability column per class, and the true class where ``labels`` are known.
    Returns the accuracy when they are (None otherwise)."""
    probs = loaded.predict(images)
    predicted = probs.argmax(1)
    classes = loaded.classes
    text = io.StringIO()
    writer = csv.writer(text)
    header = ["name", "predicted", *[f"p_{c}" for c in classes], *(["label"] if labels is not None else [])]
    writer.writerow([csv_cell(c) for c in header])
    for i, name in enumerate(names):
        row = [name, classes[int(predicted[i])], *[f"{float(p):.6f}" for p in probs[i]]]
        row += [classes[int(labels[i])]] if labels is not None else []
        writer.writerow([csv_cell(c) for c in row])
    atomic_write_text(Path(out), text.getvalue())
    return None if labels is None else (predicted == labels).float().mean().item()


@dataclass(frozen=True)
class Evaluated:
    """What a client measured of the model it exports: its id (None: a new client), the round, the
    result on its own test part, the offset it predicted with, and a note where it was not evaluated
    in the run's last round."""

    client: int | None
    server_round: int
    result: EvalResult
    offset: torch.Tensor | None
    note: str | None = None


def export_model(
    path: str | Path,
    *,
    model: nn.Module,
    keys: list[str] | None,
    shared: Mapping[str, torch.Tensor],
    cfg: Config,
    policy: Policy,
    dataset: Any,
    shard: ClientShard,
    evaluated: Evaluated,
) -> None:
    """Write the model a client just evaluated, with its header (what :func:`load_personalized`
    needs, the accuracy it measured) and its gate fingerprint (fitted on ``shard``'s train part, the
    threshold set on its test part)."""
    client, server_round, result = evaluated.client, evaluated.server_round, evaluated.result
    offset, note = evaluated.offset, evaluated.note
    m = cfg.model
    weight = None
    if offset is not None:
        prior = label_log_prior(shard.train_labels, dataset.num_classes, policy.prior_smoothing)
        weight = float((offset * prior).sum() / (prior * prior).sum())
    header: dict[str, Any] = {
        "client": client,
        "policy": cfg.personalization.policy,
        "dataset": cfg.data.dataset,
        "model": {"name": m.name, "width": m.width, "reduction": m.reduction, "norm": m.norm},
        "num_classes": dataset.num_classes,
        "in_channels": dataset.channels,
        "image_size": dataset.image_size,
        "classes": list(dataset.classes),
        "mean": list(dataset.mean),
        "std": list(dataset.std),
        "prior": {
            "mode": policy.label_prior if offset is not None else "off",
            "weight": weight,
            "smoothing": policy.prior_smoothing,
        },  # what predict applies (the offset tensor); the weight is on the prior counted with this smoothing
        "round": server_round,
        "evaluated_in_final_round": note is None,
        "local_acc": result.accuracy,
        "local_loss": result.loss,
        "test_samples": result.num_examples,
        "train_samples": len(shard.train_labels),
    }
    if note is not None:
        header["note"] = note
    fitted = fit_gates(model, shard.train_images, shard.test_images, mean=dataset.mean, std=dataset.std)
    gates = None
    if fitted is not None:
        gates, header["gate_threshold"] = fitted
    write_personalized(path, model=model, keys=keys, shared=shared, offset=offset, header=header, gates=gates)


def adapt_new_client(
    run_dir: str | Path, data_dir: str | Path, out: str | Path, overrides: list[str] | None = None
) -> PersonalizedModel:
    """A client that did not take part in the run (deployment's cold start, as ``fedse compare
    --holdout``): build the run's model with its final shared weights, fit the policy's private part
    (every key where the policy keeps none) for ``personalization.finetune_epochs`` on the client's
    own train part (``data_dir``), evaluate on its own test part, and write its complete model to
    ``out``. Returns it loaded."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / RECORD, overrides or [], record=True)
    shared_path = run_dir / SHARED_FILE
    if not shared_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {SHARED_FILE}: is it a finished run folder?")
    shared = _read_shared(shared_path)
    fed = own_data(cfg, data_dir)
    shard, ds = fed.shard(0), fed.dataset
    model = build_model(cfg, *model_shape(cfg, ds))
    policy = resolve(cfg)
    split = policy.split(model)
    state = model.state_dict()
    if set(shared) != set(split.shared) or any(shared[k].shape != state[k].shape for k in split.shared):
        raise StateCorruptError(f"{shared_path} does not hold this run's shared tensors (policy or model changed?)")
    if not all(torch.isfinite(v).all() for v in shared.values() if v.is_floating_point()):
        raise StateCorruptError(f"{shared_path}: the shared weights hold NaN or inf")
    model.load_state_dict(shared, strict=False)
    keys = split.private or None
    epochs = cfg.personalization.finetune_epochs
    run = ClientRun(cfg, policy, shard, ds.mean, ds.std, cfg.seed)
    run.adapt(model, keys, epochs=epochs, private=split.private)
    offset = policy.prediction_offset(run, model)
    result = run.evaluate(model, offset)
    note = (
        f"a new client: its private part fitted for {epochs} epochs on its own data on the run's final shared weights"
    )
    export_model(
        out,
        model=model,
        keys=None,
        shared=shared,
        cfg=cfg,
        policy=policy,
        dataset=ds,
        shard=shard,
        evaluated=Evaluated(None, 0, result, offset, note),
    )
    return load_personalized(out)
