"""Client side: Message in -> restore private state -> train or evaluate -> Message out.

The reply to a train message carries the *shared* keys only; the private keys
(excitation MLPs under the default policy) are written to ``context.state`` and
never put into a message. :func:`make_client_app` wraps these handlers in a
Flower :class:`~flwr.clientapp.ClientApp` (``clients/app.py`` exposes it).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..config import Config, config_from_dict
from ..data.federated import ClientShard, FederatedData, build_federated_data, model_shape, own_data
from ..models import SEResNet, build_model
from ..personal import MODEL_FILE, Evaluated, client_model_path, export_model
from ..policies import ClientRun, Policy, resolve
from ..privacy import SampleDP, check_dp_model, sample_noise_multiplier
from ..records import (
    ARRAYS,
    CLIENT,
    CLIENT_ID,
    CONFIG,
    CONFIG_JSON,
    DIGEST_IN,
    DIGEST_OUT,
    DP_EPSILON,
    EXPORT_ONLY,
    FINAL,
    LOCAL_ACC,
    LOCAL_LOSS,
    METRICS,
    NODE_CLIENT_ID,
    NODE_DATA_DIR,
    NODE_PARTITION_ID,
    NODE_STATE_DIR,
    NUM_EXAMPLES,
    NUM_TRAIN,
    POOLED,
    POOLED_ACC,
    POOLED_LOSS,
    PROXIMAL_MU,
    SERVER_ROUND,
    TRAIN_ACC,
    TRAIN_LOSS,
    TRAINED_BEFORE,
    check_arrays,
    from_arrays,
    non_finite,
    to_arrays,
)
from ..split import Split
from ..state import RoundStore, digest, load_accountant, persist, restore, save_accountant
from ..train import EvalResult, evaluate

__all__ = ["handle_evaluate", "handle_train", "make_client_app"]


@functools.lru_cache(maxsize=8)
def _parse_config(text: str) -> Config:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"message config '{CONFIG_JSON}' is not valid JSON: {err}") from None
    return config_from_dict(raw)


@dataclass
class _Setup:
    cfg: Config
    client_id: int
    fed: FederatedData
    shard: ClientShard
    model: SEResNet
    split: Split
    policy: Policy
    run: ClientRun
    own_data: bool
    extra: dict[str, torch.Tensor]  # the policy's extra private state (Ditto's personal model), if any
    received: dict[str, torch.Tensor]  # the shared weights as the server sent them


def _client_data(context: Context, cfg: Config) -> tuple[int, FederatedData, ClientShard]:
    """(client id, its federation, its shard): its own ``data-dir`` when the node has one
    (the id is then ``client-id`` or the node id, for reports), else partition ``partition-id``
    of the run's dataset (simulation and demos)."""
    node = context.node_config
    if NODE_DATA_DIR in node:
        fed = own_data(cfg, str(node[NODE_DATA_DIR]))
        return int(node.get(NODE_CLIENT_ID, context.node_id)), fed, fed.shard(0)
    if NODE_PARTITION_ID not in node:
        raise ValueError(
            f"this SuperNode has neither '{NODE_DATA_DIR}' nor '{NODE_PARTITION_ID}' in its node config; start it "
            "with fedse client --data-dir DIR (or --partition-id N for a demo)"
        )
    cid = int(node[NODE_PARTITION_ID])
    if not 0 <= cid < cfg.partition.num_clients:
        raise ValueError(f"partition-id {cid} out of range 0..{cfg.partition.num_clients - 1}")
    fed = build_federated_data(cfg)
    return cid, fed, fed.shard(cid)


def _setup(msg: Message, context: Context, state_root: str | None = None) -> _Setup:
    """Parse the config, load this client's shard, build the model with the received
    shared weights and this client's own private weights (``state_root``: where a simulated
    client's private state lives on disk, :func:`_round_store`)."""
    if CONFIG not in msg.content.config_records or CONFIG_JSON not in msg.content[CONFIG]:
        raise ValueError(f"message has no '{CONFIG}.{CONFIG_JSON}' record; is the server a fedse ServerApp?")
    cfg = _parse_config(str(msg.content[CONFIG][CONFIG_JSON]))
    cid, fed, shard = _client_data(context, cfg)
    ds = fed.dataset
    model = build_model(cfg, *model_shape(cfg, ds))  # the data must fit the run's model shape
    policy = resolve(cfg)
    split = policy.split(model)
    state = model.state_dict()
    received = msg.content[ARRAYS]
    if problems := check_arrays(received, {k: tuple(state[k].shape) for k in split.shared}):
        raise ValueError(f"server sent invalid shared weights: {'; '.join(problems)}")
    sent = from_arrays(received)
    update = dict(sent)
    template = {**split.private_state(model), **policy.extra_state(model)}
    private = restore(context, template, _round_store(state_root, cid, msg))
    if private is None and cid in list(msg.content[CONFIG].get(TRAINED_BEFORE, [])):
        raise ValueError(
            f"client {cid} trained in this run before the server resumed it, but its private state is gone "
            "(not in this process, not on disk); it will not continue from the common initialisation. Restore "
            "its state (a deployed client's --state-dir, a simulation's run folder) and resume again"
        )
    if private is not None:
        update.update({k: v for k, v in private.items() if k in split.private})
    model.load_state_dict(update, strict=False)
    # The extra state as stored; on a client's first round, initialised from the received model.
    extra = {k: v for k, v in private.items() if k not in split.private} if private else policy.extra_state(model)
    own = NODE_DATA_DIR in context.node_config
    run = ClientRun(cfg, policy, shard, ds.mean, ds.std, _seed(cfg, cid, msg))
    return _Setup(cfg, cid, fed, shard, model, split, policy, run, own, extra, sent)


def _round_store(state_root: str | None, client_id: int, msg: Message) -> RoundStore | None:
    """A simulated client's private state in the run folder (None for a deployed client, which
    keeps its own in its state-dir): a train message of round r reads what the client kept before
    round r and writes round r's; an evaluate message reads what it kept up to round r."""
    if state_root is None:
        return None
    server_round = int(msg.content[CONFIG].get(SERVER_ROUND, 0))
    return RoundStore(state_root, client_id, server_round, inclusive=msg.metadata.message_type != MessageType.TRAIN)


def _reply(msg: Message, arrays: ArrayRecord | None, metrics: dict, client: dict) -> Message:
    content = RecordDict({METRICS: MetricRecord(metrics), CLIENT: ConfigRecord(client)})
    if arrays is not None:
        content[ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


def _seed(cfg: Config, client_id: int, msg: Message) -> int:
    return cfg.seed * 100_003 + client_id * 1_009 + int(msg.content[CONFIG].get(SERVER_ROUND, 0))


def handle_train(msg: Message, context: Context, state_root: str | None = None) -> Message:
    """Train locally; keep private keys in ``context.state`` (and, for a simulated client, in
    ``state_root``); reply with shared keys only."""
    s = _setup(msg, context, state_root)
    private_in = s.split.private_state(s.model)
    extra = s.policy.before_update(s.run, s.model, s.extra)
    mu = float(msg.content[CONFIG].get(PROXIMAL_MU, 0.0))
    pr = s.cfg.privacy
    dp = None
    if pr.mode == "sample":
        check_dp_model(s.model)
        sigma = sample_noise_multiplier(s.cfg, len(s.shard.train_labels), s.policy.schedule == "private-first")
        dp = SampleDP(
            sigma, pr.max_grad_norm, pr.accountant, state=load_accountant(context), secure_mode=pr.secure_mode
        )
    result = s.run.local_update(
        s.model, s.split, proximal_mu=mu, anchor=s.split.shared_state(s.model) if mu > 0 else None, dp=dp
    )
    s.model.cpu()
    private_out = s.split.private_state(s.model)
    extra_out = s.policy.after_update(s.run, s.model, extra, s.received)
    if dp is not None:
        save_accountant(context, dp.state())  # the steps were taken: their privacy cost counts, whatever follows
    if diverged := non_finite({**private_out, **extra_out, **s.split.shared_state(s.model)}):
        # Kept, a NaN private part would break every later round of this client: the client keeps what it
        # held before this round and replies with an error (the round counts it as a failure).
        raise FloatingPointError(
            f"client {s.client_id}: local training diverged in round {msg.content[CONFIG].get(SERVER_ROUND, 0)} "
            f"(non-finite {', '.join(diverged[:3])}{', ...' if len(diverged) > 3 else ''}); its private state stays as "
            f"it was before the round and it sends no update; allowed: a train.lr (now {s.cfg.train.lr}) and "
            f"train.momentum (now {s.cfg.train.momentum}) at which training stays finite (models without "
            "normalisation layers, the cnn family, need lower ones)"
        )
    persist(context, {**private_out, **extra_out}, _round_store(state_root, s.client_id, msg))
    client = {CLIENT_ID: s.client_id}
    if s.cfg.evaluate.private_digest:
        client |= {DIGEST_IN: digest(private_in), DIGEST_OUT: digest(private_out)}
    metrics: dict[str, float | int] = {NUM_EXAMPLES: len(s.shard.train_labels)}
    if dp is None:
        metrics |= {TRAIN_LOSS: result.loss, TRAIN_ACC: result.accuracy}
    else:  # training-set statistics are not DP: only the cumulative epsilon is reported
        metrics[DP_EPSILON] = dp.epsilon(pr.delta)
    return _reply(msg, to_arrays(s.split.shared_state(s.model)), metrics, client)


def handle_evaluate(
    msg: Message, context: Context, export_dir: str | None = None, state_root: str | None = None
) -> Message:
    """The personalized model (the policy's evaluated model, fine-tuned where the policy fine-tunes,
    with its prediction offset) on the client's own test part; when asked, ``s.model`` (received
    shared + own private, no offset) on the pooled test set of all clients. At the run's final evaluation
    (``final`` in the message) the client writes the model it evaluated (:func:`_export`)."""
    s = _setup(msg, context, state_root)
    final = bool(msg.content[CONFIG].get(FINAL, False))
    received = s.split.shared_state(s.model) if final else None  # copies, taken before any fine-tuning
    mine = s.policy.evaluated_model(s.run, s.model, s.extra)
    s.run.finetune(mine)  # fedavg-ft (all of it), fedbabu (the head): fine-tune what was received; nothing is kept
    bias = s.policy.prediction_offset(s.run, mine)
    local = s.run.evaluate(mine, bias)
    if final:
        _export(s, mine, msg, context, local, bias, received, export_dir)
    metrics: dict[str, float | int] = {
        NUM_EXAMPLES: local.num_examples,
        LOCAL_ACC: local.accuracy,
        LOCAL_LOSS: local.loss,
    }
    if bool(msg.content[CONFIG].get(POOLED, False)):
        if s.own_data:
            raise ValueError(
                "the server asked for the pooled test set, which a client with its own data-dir "
                "does not have; run with --set evaluate.pooled=false"
            )
        x, y = s.fed.pooled_test(s.cfg.evaluate.pooled_max_samples, s.cfg.seed)
        # s.model: the received shared weights with this client's private keys, fine-tuned above where
        # the policy fine-tunes and evaluates s.model itself (fedavg-ft, fedbabu); the global model only
        # where nothing is private or fine-tuned. No label-prior offset: the pooled test set follows the
        # federation's label distribution, not this client's.
        pooled = evaluate(s.model, x, y, mean=s.run.mean, std=s.run.std, device=s.run.device)
        metrics |= {POOLED_ACC: pooled.accuracy, POOLED_LOSS: pooled.loss}
    client = {CLIENT_ID: s.client_id, NUM_TRAIN: len(s.shard.train_labels)}
    return _reply(msg, None, metrics, client)


def _export(
    s: _Setup,
    model: SEResNet,
    msg: Message,
    context: Context,
    local: EvalResult,
    bias: torch.Tensor | None,
    received: dict[str, torch.Tensor],
    export_dir: str | None,
) -> None:
    """Write the model just evaluated (fedse.personal): a deployed client with a state-dir writes the
    complete model there; a simulated client writes its private part (the whole model where the
    policy fine-tunes at evaluation) into the run folder's ``clients/``; a client with neither writes
    nothing. The path comes from the node or the simulator, never from the message."""
    state_dir = context.node_config.get(NODE_STATE_DIR)
    if state_dir:
        path, keys = Path(str(state_dir)) / MODEL_FILE, None
    elif export_dir is not None:
        path = client_model_path(export_dir, s.client_id)
        whole = s.policy.finetune or model is not s.model  # fine-tuned, or a model of the client's own
        keys = None if whole else list(s.split.private)
    else:
        return
    config = msg.content[CONFIG]
    note = None
    if config.get(EXPORT_ONLY, False):
        note = "not evaluated in the run's last round: the final shared weights plus this client's latest private part"
    export_model(
        path,
        model=model,
        keys=keys,
        shared=received,
        cfg=s.cfg,
        policy=s.policy,
        dataset=s.fed.dataset,
        shard=s.shard,
        evaluated=Evaluated(s.client_id, int(config.get(SERVER_ROUND, 0)), local, bias, note),
    )


def make_client_app(export_dir: str | Path | None = None, state_root: str | Path | None = None) -> ClientApp:
    """The ClientApp. ``export_dir``: where simulated clients write their personalized models at the
    end of a run; ``state_root``: where they keep their private state between rounds, for a resumed
    run (both in the run folder; set by :func:`fedse.simulation.simulate`, which hands this app to
    its actors). Deployed clients keep both in their ``state-dir``."""
    app = ClientApp()
    export = None if export_dir is None else str(export_dir)
    root = None if state_root is None else str(state_root)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, root)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, export, root)

    return app
