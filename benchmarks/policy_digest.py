"""A SHA-256 per policy of everything a client produces on the quickstart, for refactors that
must not change a result: two rounds of every client's train and evaluate messages through the
real ClientApp handlers (in process, no Ray), the server's part a plain sample-weighted mean of
the shared replies. Each digest covers, in order: every train reply (shared tensors, metrics,
client record), every private state a client keeps (private keys and extra state, by key),
every evaluate reply, and every exported model file's bytes.

    python benchmarks/policy_digest.py > before.txt   # then, after the change:
    python benchmarks/policy_digest.py | diff before.txt -

One line per policy: name, digest. Identical lines mean bit-for-bit identical behaviour.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedse.config import config_to_dict, load_config  # noqa: E402
from fedse.data.federated import build_federated_data, model_shape  # noqa: E402
from fedse.federation.client import handle_evaluate, handle_train  # noqa: E402
from fedse.models import build_model  # noqa: E402
from fedse.policies import POLICIES, resolve  # noqa: E402
from fedse.records import (  # noqa: E402
    ARRAYS,
    CONFIG,
    CONFIG_JSON,
    FINAL,
    METRICS,
    NODE_PARTITION_ID,
    NUM_EXAMPLES,
    POOLED,
    SERVER_ROUND,
    from_arrays,
    to_arrays,
)
from fedse.state import load_private  # noqa: E402


def _feed(h: hashlib._Hash, name: str, value: object) -> None:
    h.update(name.encode())
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        h.update(str((value.dtype, value.shape)).encode())
        h.update(np.ascontiguousarray(value).tobytes())
    else:
        h.update(json.dumps(value, sort_keys=True, default=str).encode())


def _records(h: hashlib._Hash, content: RecordDict) -> None:
    for name, record in sorted(content.array_records.items()):
        for key, array in sorted(from_arrays(record).items()):
            _feed(h, f"{name}.{key}", array)
    for name, record in sorted(content.metric_records.items()):
        _feed(h, name, dict(record))
    for name, record in sorted(content.config_records.items()):
        _feed(h, name, dict(record))


def digest(policy: str, config: Path | None, overrides: list[str], rounds: int) -> str:
    cfg = load_config(config, [*overrides, f"personalization.policy={policy}"])
    fed = build_federated_data(cfg)
    model = build_model(cfg, *model_shape(cfg, fed.dataset))
    split = resolve(cfg).split(model)
    template = {**split.private_state(model), **resolve(cfg).extra_state(model)}
    shared = split.shared_state(model)
    contexts = [
        Context(run_id=1, node_id=c + 1, node_config={NODE_PARTITION_ID: c}, state=RecordDict(), run_config={})
        for c in range(cfg.partition.num_clients)
    ]
    h = hashlib.sha256()
    text = json.dumps(config_to_dict(cfg))

    def message(kind: str, server_round: int, **extra: object) -> Message:
        record = ConfigRecord({CONFIG_JSON: text, SERVER_ROUND: server_round, **extra})
        return Message(RecordDict({ARRAYS: to_arrays(shared), CONFIG: record}), dst_node_id=1, message_type=kind)

    with tempfile.TemporaryDirectory() as export:
        for server_round in range(1, rounds + 1):
            replies = [handle_train(message(MessageType.TRAIN, server_round), ctx) for ctx in contexts]
            total = 0
            summed: dict[str, np.ndarray] = {}
            for c, reply in enumerate(replies):
                _records(h, reply.content)
                _feed(
                    h,
                    f"state-{c}",
                    {k: v.numpy().tolist() for k, v in sorted(load_private(contexts[c], template).items())},
                )
                n = int(reply.content[METRICS][NUM_EXAMPLES])
                total += n
                for k, v in from_arrays(reply.content[ARRAYS]).items():
                    summed[k] = summed.get(k, 0) + n * v.numpy().astype(np.float64)
            shared = {k: torch.from_numpy((v / total).astype(np.float32)) for k, v in summed.items()}
            final = server_round == rounds
            for ctx in contexts:
                reply = handle_evaluate(
                    message(MessageType.EVALUATE, server_round, **{POOLED: True, FINAL: final}), ctx, export
                )
                _records(h, reply.content)
        for path in sorted(p for p in Path(export).rglob("*") if p.is_file()):
            h.update(str(path.relative_to(export)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # messages made outside Flower
    for policy in args.policies.split(","):
        print(policy, digest(policy, args.config, args.overrides, args.rounds), flush=True)


if __name__ == "__main__":
    main()
