"""The comparison: gain arithmetic by hand, and a real two-method run writing every file."""

import copy
import json
import re
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import tiny_config

from fedse.analysis.comparison import MethodRun, gain_table, merge, method_table
from fedse.config import ConfigError
from simulations.compare import compare


def _accuracy(model, images, labels, mean, std):
    """Accuracy from a plain eval-mode forward pass and argmax: no fedse code."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    model.eval()
    with torch.no_grad():
        predicted = model((images.float() / 255 - m) / s).argmax(1)
    return (predicted == labels).sum().item() / len(labels)


def test_gain_table_hand_computed():
    rows = [
        {"client": 0, "fedavg": 0.50, "fedse": 0.70, "fedper": 0.40},
        {"client": 1, "fedavg": 0.80, "fedse": 0.80, "fedper": 0.90},
        {"client": 2, "fedavg": 0.60, "fedse": 0.50, "fedper": 0.90},
    ]
    gains = {g["method"]: g for g in gain_table(rows)}
    assert gains["fedse"]["mean_gain_points"] == pytest.approx((20 + 0 - 10) / 3)
    assert (gains["fedse"]["clients_gain"], gains["fedse"]["clients_tie"], gains["fedse"]["clients_lose"]) == (1, 1, 1)
    assert gains["fedper"]["mean_gain_points"] == pytest.approx((-10 + 10 + 30) / 3)
    assert (gains["fedper"]["clients_gain"], gains["fedper"]["clients_lose"]) == (2, 1)
    assert gain_table([{"client": 0, "fedse": 0.5}]) == []  # no fedavg: no gains


def test_method_table_reports_the_client_mean_and_the_sample_weighted_accuracy():
    """Two seeds of one method: the client mean weighs clients equally, the weighted figure weighs
    test samples (PFLlib's), both mean ± std over seeds; a run without test sizes gives '-'."""

    def run(seed, clients):
        rows = [{"local_acc": a, "test_samples": n, "pooled_acc": None} for a, n in clients]
        split = {"private_params": 0, "private_percent": 0.0}
        return MethodRun("fedavg", seed, [{"local_acc_mean": 0.5}], rows, [], split, 8, 1.0)

    # seed 0: mean (1.0 + 0.5) / 2 = 0.75, weighted (10 * 1.0 + 30 * 0.5) / 40 = 0.625
    # seed 1: mean (0.5 + 0.5) / 2 = 0.5, weighted 0.5
    row = method_table([run(0, [(1.0, 10), (0.5, 30)]), run(1, [(0.5, 10), (0.5, 30)])])[0]
    assert row["personalized_mean_last"] == "62.50 ± 12.50"
    assert row["personalized_weighted_last"] == "56.25 ± 6.25"
    assert method_table([run(0, [(1.0, None), (0.5, 30)])])[0]["personalized_weighted_last"] == "-"


@pytest.mark.slow
def test_two_method_comparison_writes_every_file(tmp_path):
    cfg = tiny_config(partition={"num_clients": 4}, output={"dir": str(tmp_path)})
    out = tmp_path / "cmp"
    summary = compare(cfg, ["fedavg", "fedse"], [0], out, holdout=1)
    files = {p.name for p in out.iterdir()}
    assert files >= {
        "table.md",
        "table.csv",
        "per_client.csv",
        "gains.csv",
        "holdout.csv",
        "comparison.json",
        "accuracy_per_round.png",
        "personalized_vs_global.png",
        "label_distribution.png",
        "runs",
    }
    # Identical partitions across methods: the same label counts per client.
    counts = [json.loads((out / "runs" / f"{m}-seed0" / "label_counts.json").read_text()) for m in ("fedavg", "fedse")]
    assert counts[0] == counts[1]
    table = {row["method"]: row for row in summary["table"]}
    assert table["fedavg"]["private_params"] == 0 and table["fedse"]["private_params"] > 0
    assert table["fedse"]["upload_bytes_per_client_round"] < table["fedavg"]["upload_bytes_per_client_round"]
    # Three clients trained, one held out and adapted at the end.
    assert all(len(r["clients"]) == 3 for r in summary["runs"])
    assert [[h["client"] for h in r["holdout"]] for r in summary["runs"]] == [[3], [3]]
    fedavg_hold = summary["runs"][0]["holdout"][0]
    assert fedavg_hold["private_acc"] == fedavg_hold["global_acc"]  # nothing private to adapt
    # Client 3's accuracies recomputed from each run's final shared weights (shared_weights.pt):
    # `global` is that model as received; fedse's `private` adapts its excitation keys only.
    from fedse.config import load_config
    from fedse.data.federated import build_federated_data
    from fedse.models import build_model
    from fedse.policies import ClientRun, create_policy, resolve

    for run in summary["runs"]:
        folder = out / "runs" / f"{run['method']}-seed0"
        run_cfg = load_config(folder / "config.yaml")
        policy = resolve(run_cfg)
        assert policy.label_prior == "off"  # so no logit offset in the accuracy
        fed = build_federated_data(run_cfg)
        shard, ds = fed.shard(3), fed.dataset
        model = build_model(run_cfg, ds.num_classes, ds.channels, ds.image_size)
        split = create_policy(run["method"]).split(model)
        loaded = model.load_state_dict(torch.load(folder / "shared_weights.pt"), strict=False)
        assert set(loaded.missing_keys) == set(split.private)  # the private keys keep the common init
        [hold] = run["holdout"]
        assert hold["train_samples"] == len(shard.train_labels)
        assert hold["global_acc"] == _accuracy(model, shard.test_images, shard.test_labels, ds.mean, ds.std)
        if split.private:
            before = copy.deepcopy(model.state_dict())
            run_ = ClientRun(run_cfg, policy, shard, ds.mean, ds.std, seed=run_cfg.seed + 3)
            run_.adapt(model, split.private, epochs=run_cfg.personalization.finetune_epochs, private=split.private)
            moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
            assert moved and moved <= set(split.private)
            assert hold["private_acc"] == _accuracy(model, shard.test_images, shard.test_labels, ds.mean, ds.std)


@pytest.mark.slow
def test_merge_combines_folders_measured_apart(tmp_path):
    cfg = tiny_config(partition={"num_clients": 3}, output={"dir": str(tmp_path)}, server={"rounds": 1})
    a = compare(cfg, ["fedavg"], [0], tmp_path / "a")
    b = compare(cfg, ["fedse"], [0, 1], tmp_path / "b")
    merged = merge([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    assert merged["methods"] == ["fedavg", "fedse"] and merged["seeds"] == [0, 1]
    assert merged["table"] == a["table"] + b["table"]  # every figure is the one measured, unchanged
    # fedavg ran seed 0 only: fedse's gain pairs its seed-0 clients with fedavg's, never seed 1's
    # (another partition, so other clients).
    gain = merged["gains"][0]
    clients = {c["client"]: c for c in b["runs"][0]["clients"]}
    assert b["runs"][0]["seed"] == 0
    expected = [clients[c["client"]]["local_acc"] - c["local_acc"] for c in a["runs"][0]["clients"]]
    assert gain["method"] == "fedse" and gain["paired_seeds"] == 1
    assert gain["mean_gain_points"] == pytest.approx(100 * sum(expected) / 3)

    # A setting only some policies read: fedavg and fedse never count a label prior, so their
    # folders merge with one measured at another prior smoothing, and the merged configuration
    # records the smoothing of the methods that read it; two folders that both read it must agree.
    def at(smoothing):
        return replace(cfg, personalization=replace(cfg.personalization, prior_smoothing=smoothing))

    compare(at(16.0), ["fedse-la"], [0], tmp_path / "s16")
    merged = merge([tmp_path / "a", tmp_path / "b", tmp_path / "s16"], tmp_path / "ab_s16")
    assert merged["methods"] == ["fedavg", "fedse", "fedse-la"]
    assert merged["config"]["personalization"]["prior_smoothing"] == 16.0
    compare(at(1.0), ["fedavg-la"], [1], tmp_path / "s1")  # reads the prior, at smoothing 1
    with pytest.raises(ConfigError, match="another configuration"):
        merge([tmp_path / "s16", tmp_path / "s1"], tmp_path / "x")
    with pytest.raises(ConfigError, match="another configuration"):
        merge([tmp_path / "a", tmp_path / "s16", tmp_path / "s1"], tmp_path / "x")
    # --methods picks methods out of folders: fedavg from the smoothing-16 folder goes with fedavg-la at 1.
    picked = merge([tmp_path / "ab_s16", tmp_path / "s1"], tmp_path / "picked", methods=["fedavg", "fedavg-la"])
    assert picked["methods"] == ["fedavg", "fedavg-la"] and {r["method"] for r in picked["runs"]} == set(
        picked["methods"]
    )
    assert picked["config"]["personalization"]["prior_smoothing"] == 1.0
    with pytest.raises(ConfigError, match="--methods fedrod: in none of the folders"):
        merge([tmp_path / "a", tmp_path / "b"], tmp_path / "x", methods=["fedavg", "fedrod"])
    assert (tmp_path / "ab" / "table.md").is_file() and (tmp_path / "ab" / "personalized_vs_global.png").is_file()

    with pytest.raises(ConfigError, match="method 'fedavg', seed 0 is in both"):
        merge([tmp_path / "a", tmp_path / "ab"], tmp_path / "x")
    other = json.loads((tmp_path / "b" / "comparison.json").read_text())
    other["config"]["partition"]["alpha"] = 0.1  # another partition: its clients are not the same clients
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "comparison.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="another configuration"):
        merge([tmp_path / "a", tmp_path / "c"], tmp_path / "x")
    # width null builds the family's default width (16 for se_resnet8): the same model as width 16, so
    # such folders merge; null against width 8 (tiny_config's) is another model and is refused.
    for name, source, width in (("w_null", "a", None), ("w16", "b", 16)):
        data = json.loads((tmp_path / source / "comparison.json").read_text())
        data["config"]["model"]["width"] = width
        (tmp_path / name).mkdir()
        (tmp_path / name / "comparison.json").write_text(json.dumps(data))
    assert merge([tmp_path / "w_null", tmp_path / "w16"], tmp_path / "w")["methods"] == ["fedavg", "fedse"]
    with pytest.raises(ConfigError, match="another configuration"):
        merge([tmp_path / "w_null", tmp_path / "b"], tmp_path / "x")
    with pytest.raises(ConfigError, match="is not a comparison folder"):
        merge([tmp_path / "a", tmp_path / "missing"], tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing written on a refused merge


@pytest.mark.slow
def test_a_comparison_survives_interruption(tmp_path, monkeypatch):
    import fedse.federation.server

    cfg = tiny_config(partition={"num_clients": 3}, output={"dir": str(tmp_path)})
    out = tmp_path / "cmp"
    first = compare(cfg, ["fedavg"], [0], out)
    folder = out / "runs" / "fedavg-seed0"
    stamp = (folder / "method_run.json").stat().st_mtime_ns
    again = compare(cfg, ["fedavg"], [0], out)  # finished: read back, not rerun
    assert (folder / "method_run.json").stat().st_mtime_ns == stamp
    assert again["table"] == first["table"]
    # a run folder written before a config key existed (here: without prior_smoothing) is read back too
    saved = json.loads((folder / "method_run.json").read_text())
    del saved["config"]["personalization"]["prior_smoothing"]
    (folder / "method_run.json").write_text(json.dumps(saved))
    stamp = (folder / "method_run.json").stat().st_mtime_ns
    assert compare(cfg, ["fedavg"], [0], out)["table"] == first["table"]
    assert (folder / "method_run.json").stat().st_mtime_ns == stamp
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)  # a folder moved (or named by another path) is read back as well
    moved_stamp = (moved / "runs" / "fedavg-seed0" / "method_run.json").stat().st_mtime_ns
    assert compare(cfg, ["fedavg"], [0], moved)["table"] == first["table"]
    assert (moved / "runs" / "fedavg-seed0" / "method_run.json").stat().st_mtime_ns == moved_stamp
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["provenance"]) >= {"fedse", "torch", "flwr", "opacus", "device"}

    # fedse's run is interrupted while it writes its report (after its last round).
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fedse.federation.server, "write_run", crash)
    with pytest.raises(OSError, match="disk full"):
        compare(cfg, ["fedavg", "fedse"], [0], out)
    interrupted = out / "runs" / "fedse-seed0"
    assert (interrupted / "checkpoint.pt").is_file() and not (interrupted / "method_run.json").exists()
    timed = torch.load(interrupted / "checkpoint.pt", weights_only=True)["log"]["round_seconds"]
    monkeypatch.undo()
    done = compare(cfg, ["fedavg", "fedse"], [0], out)  # continues fedse from its checkpoint
    fedse_run = next(r for r in done["runs"] if r["method"] == "fedse")
    assert [r["round"] for r in fedse_run["rounds"]] == [1, 2]
    # round 1 was not redone (its time is the one recorded before the interruption); the last round's
    # checkpoint is written with the run's report, so the run continued from round 1 and redid round 2
    assert sorted(timed) == [1] and fedse_run["rounds"][0]["seconds"] == timed[1]
    other = tiny_config(partition={"num_clients": 3}, model={"width": 4}, output={"dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="another configuration"):
        compare(other, ["fedavg"], [0], out)


def _run_dict(method: str) -> dict:
    from dataclasses import asdict

    return asdict(MethodRun(method, 0, [], [], [], {"private_params": 0, "private_percent": 0.0}, 0, 1.0))


def test_merge_refuses_a_folder_naming_an_unknown_policy(tmp_path):
    from fedse.config import config_to_dict

    for name, methods in (("a", ["fedavg"]), ("b", ["no-such-policy"])):
        (tmp_path / name).mkdir()
        runs = [_run_dict(m) for m in methods]
        data = {"config": config_to_dict(tiny_config()), "methods": methods, "runs": runs, "table": [], "holdout": 0}
        (tmp_path / name / "comparison.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="'personalization.policy': 'no-such-policy' is not a policy"):
        merge([tmp_path / "a", tmp_path / "b"], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_finished_run_recorded_before_a_default_changed_is_not_taken_for_todays(tmp_path):
    """``compare --out`` reads a finished run back only if it measured the same thing: a record without a
    schema lacking prior_smoothing ran with add-one smoothing, so for fedse-la (which reads it) it is not
    today's default of 16; for fedavg (which does not) it is the same run."""
    from dataclasses import asdict

    from fedse.config import config_to_dict

    cfg = tiny_config(output={"dir": str(tmp_path)})
    out = tmp_path / "cmp"
    for method in ("fedse-la", "fedavg"):
        run_cfg = replace(
            cfg,
            personalization=replace(cfg.personalization, policy=method),
            output=replace(cfg.output, dir=str(out / "runs"), name=f"{method}-seed0"),
        )
        legacy = config_to_dict(run_cfg)  # a record written before schemas
        del legacy["personalization"]["prior_smoothing"]
        split = {"private_params": 0, "private_percent": 0.0}
        run = MethodRun(method, 0, [{"round": 1, "local_acc_mean": 0.5}], [], [], split, 0, 1.0)
        folder = out / "runs" / f"{method}-seed0"
        folder.mkdir(parents=True)
        (folder / "method_run.json").write_text(json.dumps({"config": legacy, "holdout": 0, "run": asdict(run)}))
    with pytest.raises(ConfigError, match="fedse-la-seed0 was run with another configuration"):
        compare(cfg, ["fedse-la"], [0], out)
    summary = compare(cfg, ["fedavg"], [0], out)  # read back, not rerun
    assert [(r["method"], r["seconds"]) for r in summary["runs"]] == [("fedavg", 1.0)]


@pytest.mark.parametrize(
    "damage,pattern",
    [
        (lambda r: r.pop("seconds"), "a run holds .*expected the keys"),
        (lambda r: r.update(seed="0"), "'method' must be a string, 'seed' and 'upload_bytes' integers"),
        (
            lambda r: r.update(rounds=[{"round": 1}]),
            r"'rounds' must be a list of rows, each with \['round', 'local_acc_mean'\]",
        ),
        (
            lambda r: r.update(clients=[{"client": 0, "local_acc": 7, "pooled_acc": None}]),
            "'clients' row local_acc=7; allowed: an accuracy",
        ),
        (lambda r: r.update(split={}), "'split' must hold 'private_params'"),
    ],
)
def test_a_damaged_run_file_is_one_error_naming_it(damage, pattern):
    from dataclasses import asdict

    from fedse.analysis.comparison import method_run_from

    raw = asdict(MethodRun("fedavg", 0, [], [], [], {"private_params": 0, "private_percent": 0.0}, 0, 1.0))
    assert method_run_from(dict(raw), "f.json") == MethodRun(**raw)
    damage(raw)
    with pytest.raises(ConfigError, match=f"f.json: {pattern}"):
        method_run_from(raw, "f.json")


def test_merge_refuses_a_comparison_json_that_fedse_did_not_write(tmp_path):
    from fedse.config import config_to_record

    good = {
        "config": config_to_record(tiny_config()),
        "methods": ["fedavg"],
        "runs": [_run_dict("fedavg")],
        "table": [],
        "holdout": 0,
    }
    for name, data in (
        ("a", good),
        ("b", {**good, "methods": "fedavg"}),
        ("c", {**good, "runs": [{"method": 1}]}),
        ("d", {**good, "methods": ["fedavg", "fedse"]}),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "comparison.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"b/comparison.json is not a fedse comparison: expected a mapping"):
        merge([tmp_path / "a", tmp_path / "b"], tmp_path / "x")
    with pytest.raises(ConfigError, match=r"c/comparison.json run 0: a run holds \['method'\]"):
        merge([tmp_path / "a", tmp_path / "c"], tmp_path / "x")
    with pytest.raises(
        ConfigError, match=r"d/comparison.json: its methods \['fedavg', 'fedse'\] are not those of its runs"
    ):
        merge([tmp_path / "a", tmp_path / "d"], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_budget_table_hand_computed(tmp_path):
    """Two comparisons under other batch sizes side by side: steps per round are local_epochs x
    ceil(n / batch) summed over clients; the round and seconds at which the mean personalized accuracy
    first reached the target, and the upload by then, are averaged over seeds only if every seed got
    there."""
    from dataclasses import asdict

    from fedse.analysis.comparison import budget_table
    from fedse.config import config_to_record

    split = {"private_params": 0, "private_percent": 0.0}
    clients = [
        {"client": 0, "local_acc": 0.9, "pooled_acc": None, "train_samples": 25, "test_samples": 10},
        {"client": 1, "local_acc": 0.7, "pooled_acc": None, "train_samples": 10, "test_samples": 30},
    ]
    curve = lambda *accs: [  # noqa: E731
        {"round": i + 1, "local_acc_mean": a, "seconds": 10.0 + i} for i, a in enumerate(accs)
    ]
    for batch, runs in (
        (10, [MethodRun("fedavg", 0, curve(0.5, 0.91, 0.95), clients, [], split, 10**6, 40.0)]),
        (
            64,
            [
                MethodRun("fedavg", 0, curve(0.95, 0.96), clients, [], split, 10**6, 30.0),
                MethodRun("fedavg", 1, curve(0.5, 0.6), clients, [], split, 10**6, 30.0),
            ],
        ),
    ):
        (tmp_path / f"b{batch}").mkdir()
        cfg = tiny_config(train={"batch_size": batch, "local_epochs": 2})
        data = {
            "config": config_to_record(cfg),
            "methods": ["fedavg"],
            "holdout": 0,
            "runs": [asdict(r) for r in runs],
            "table": [],
        }
        (tmp_path / f"b{batch}" / "comparison.json").write_text(json.dumps(data))
    b10, b64 = budget_table([tmp_path / "b10", tmp_path / "b64"], target=0.9)
    assert (b10["batch"], b10["steps_per_round"], b64["steps_per_round"]) == (10, 2 * (3 + 1), 2 * (1 + 1))
    assert (b10["round_to_90"], b10["seconds_to_90"], b10["upload_MB_to_90"]) == ("2.0", "21", "2.00")
    assert b10["personalized_mean_last"] == "80.00" and b10["personalized_weighted_last"] == "75.00"
    assert b64["round_to_90"] == "not reached" and b64["seeds"] == 2  # seed 1 never got there
    assert b10["width"] == b64["width"] == tiny_config().model.width
    assert budget_table([tmp_path / "b10"], methods=["fedse"]) == []  # --methods picks methods out


def _run(method, seed=0, rounds=None, holdout=()):
    """A run as a comparison reads it: two clients, one round unless ``rounds``."""
    clients = [
        {"client": 0, "local_acc": 0.8, "pooled_acc": None, "test_samples": 10},
        {"client": 1, "local_acc": 0.6, "pooled_acc": None, "test_samples": 10},
    ]
    split = {"private_params": 0, "private_percent": 0.0}
    rounds = [{"round": 1, "local_acc_mean": 0.7}] if rounds is None else rounds
    return MethodRun(method, seed, rounds, clients, list(holdout), split, 8, 1.0)


def _comparison_folder(folder, cfg, runs, holdout=0):
    """A comparison folder written by hand: its comparison.json, as a merge reads it."""
    from dataclasses import asdict

    from fedse.config import config_to_record

    folder.mkdir(parents=True)
    data = {
        "config": config_to_record(cfg),
        "methods": list(dict.fromkeys(r.method for r in runs)),
        "holdout": holdout,
        "runs": [asdict(r) for r in runs],
        "table": [],
    }
    (folder / "comparison.json").write_text(json.dumps(data))
    return folder


def _one_line_error(capsys, argv):
    from fedse.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fedse: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_a_refused_merge_names_every_key_that_differs(tmp_path, capsys):
    a = _comparison_folder(tmp_path / "a", tiny_config(), [_run("fedavg")])
    other = tiny_config(train={"batch_size": 32}, partition={"alpha": 0.5})
    c = _comparison_folder(tmp_path / "c", other, [_run("fedse")])
    with pytest.raises(ConfigError, match=r"train\.batch_size: 64 vs 32") as info:
        merge([a, c], tmp_path / "x")
    assert "partition.alpha: 1.0 vs 0.5" in str(info.value) and "partition.num_clients" not in str(info.value)
    line = _one_line_error(capsys, ["compare", "--merge", str(a), str(c), "--out", str(tmp_path / "x")])
    assert "train.batch_size: 64 vs 32" in line and "partition.alpha: 1.0 vs 0.5" in line

    # a setting both folders' methods read, and from which folder the first value came
    def at(smoothing):
        return tiny_config(personalization={"prior_smoothing": smoothing})

    s16 = _comparison_folder(tmp_path / "s16", at(16.0), [_run("fedse-la")])
    s1 = _comparison_folder(tmp_path / "s1", at(1.0), [_run("fedavg-la")])
    with pytest.raises(ConfigError, match=r"personalization\.prior_smoothing: 16\.0 vs 1\.0"):
        merge([s16, s1], tmp_path / "x")
    with pytest.raises(ConfigError, match=re.escape(f"personalization.prior_smoothing: 16.0 (in '{s16}') vs 1.0")):
        merge([a, s16, s1], tmp_path / "x")  # fedavg does not read it: the 16 is s16's
    held = _comparison_folder(tmp_path / "held", tiny_config(), [_run("fedse")], holdout=1)
    with pytest.raises(ConfigError, match="--holdout: 0 vs 1"):
        merge([a, held], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_merge_never_writes_over_one_of_its_input_folders(tmp_path, capsys):
    a = _comparison_folder(tmp_path / "a", tiny_config(), [_run("fedavg")])
    b = _comparison_folder(tmp_path / "b", tiny_config(), [_run("fedse")])
    (tmp_path / "link").symlink_to(b)
    before = {p.name: p.read_bytes() for p in (a, b) for p in p.iterdir()}
    for out in (b, tmp_path / "a" / ".." / "b", tmp_path / "link", a):
        with pytest.raises(
            ConfigError, match=re.escape(f"--out '{out}' is the input folder") + ".*allowed: a folder that is none"
        ):
            merge([a, b], out)
    line = _one_line_error(capsys, ["compare", "--merge", str(a), str(b), "--out", str(b)])
    assert f"--out '{b}' is the input folder '{b}'" in line
    assert {p.name: p.read_bytes() for p in (a, b) for p in p.iterdir()} == before  # nothing written


def test_merge_refuses_an_out_under_a_regular_file_before_reading(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "merged"
    line = _one_line_error(capsys, ["compare", "--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert f"--out '{out}'" in line and "is a file" in line and "allowed" in line


def test_a_round_without_an_evaluation_is_skipped_in_every_table_and_plot(tmp_path):
    from fedse.analysis.comparison import write_comparison

    rounds = [
        {"round": 1, "local_acc_mean": None},
        {"round": 2, "local_acc_mean": 0.6},
        {"round": 3, "local_acc_mean": None},
    ]
    unevaluated = {"client": 2, "global_acc": None, "private_acc": None, "full_acc": None}
    held = [unevaluated, {"client": 3, "global_acc": 0.5, "private_acc": 0.75, "full_acc": 1.0}]
    runs = [
        _run("fedavg", rounds=rounds, holdout=held),
        _run("fedse", rounds=rounds, holdout=[unevaluated]),
        _run("fedse", seed=1, rounds=[{"round": 1, "local_acc_mean": None}]),  # never evaluated
    ]
    summary = write_comparison(tiny_config(), runs, tmp_path / "out", holdout=2, command="")
    assert {"accuracy_per_round.png", "personalized_vs_global.png", "table.md"} <= {
        p.name for p in (tmp_path / "out").iterdir()
    }
    table = {row["method"]: row for row in summary["table"]}
    assert table["fedavg"]["personalized_mean_best_round"] == "60.00"
    hold = {row["method"]: row for row in summary["holdout_table"]}
    assert (hold["fedavg"]["global_acc"], hold["fedavg"]["private_acc"], hold["fedavg"]["full_acc"]) == (
        "50.00",
        "75.00",
        "100.00",
    )
    assert hold["fedse"]["global_acc"] == "-"  # no held-out client was evaluated


@pytest.mark.parametrize(
    "damage,pattern",
    [
        (lambda r: r["rounds"][1].update(seconds="11"), r"run 0: round 2 'seconds' is '11'; allowed: a number >= 0"),
        (lambda r: r["rounds"][0].update(seconds=-1.0), r"run 0: round 1 'seconds' is -1\.0; allowed: a number >= 0"),
        (lambda r: r["rounds"][0].update(seconds=[1]), r"run 0: round 1 'seconds' is \[1\]"),
        (
            lambda r: r["clients"][1].update(train_samples="10"),
            r"run 0: client 1 'train_samples' is '10'; allowed: an integer >= 0 or null",
        ),
        (lambda r: r["clients"][0].update(train_samples=2.5), r"run 0: client 0 'train_samples' is 2\.5"),
        (
            lambda r: r["rounds"][0].update(seconds=10**400),
            r"run 0: round 1 'seconds' is an integer of about 401 digits",
        ),
        (lambda r: r.update(seconds=10**400), r"run 0: 'seconds' an integer of about 401 digits is not"),
        (lambda r: None, None),
    ],
)
def test_budget_table_refuses_a_comparison_json_of_the_wrong_types(tmp_path, damage, pattern):
    from dataclasses import asdict

    from fedse.analysis.comparison import budget_table
    from fedse.config import config_to_record

    clients = [
        {"client": 0, "local_acc": 0.9, "pooled_acc": None, "train_samples": 25, "test_samples": 10},
        {"client": 1, "local_acc": 0.7, "pooled_acc": None, "train_samples": 10, "test_samples": 30},
    ]
    rounds = [{"round": i + 1, "local_acc_mean": a, "seconds": 10.0} for i, a in enumerate((0.5, 0.95))]
    run = asdict(MethodRun("fedavg", 0, rounds, clients, [], {"private_params": 0, "private_percent": 0.0}, 10, 4.0))
    damage(run)
    data = {"config": config_to_record(tiny_config()), "methods": ["fedavg"], "holdout": 0, "runs": [run], "table": []}
    (tmp_path / "comparison.json").write_text(json.dumps(data))
    if pattern is None:
        assert budget_table([tmp_path])[0]["round_to_90"] == "2.0"
        return
    with pytest.raises(ConfigError, match=rf"comparison\.json {pattern}"):
        budget_table([tmp_path])


# --------------------------------------------------------------------------- what a reader sees


def _gained(method, seed, accuracies):
    clients = [
        {"client": c, "local_acc": a, "pooled_acc": None, "test_samples": n}
        for c, (a, n) in enumerate(zip(accuracies, (10, 30, 20, 40), strict=False))
    ]
    rounds = [{"round": 1, "local_acc_mean": 0.5}, {"round": 2, "local_acc_mean": sum(accuracies) / len(accuracies)}]
    return MethodRun(method, seed, rounds, clients, [], {"private_params": 0, "private_percent": 0.0}, 8, 1.0)


def test_the_terminal_table_is_narrow_with_two_decimals_and_the_gain_in_points(tmp_path):
    from fedse.analysis.comparison import read_comparison, terminal_table, write_comparison

    # fedavg 0.5/0.6/0.7/0.8, fedse 0.49/0.6/0.72/0.8: per-client gains -1, 0, +2, 0 points, mean +0.25
    runs = [_gained("fedavg", 0, [0.5, 0.6, 0.7, 0.8]), _gained("fedse", 0, [0.49, 0.6, 0.72, 0.8])]
    cfg = tiny_config(partition={"num_clients": 4})
    summary = write_comparison(cfg, runs, tmp_path / "out", holdout=0, command="")
    text = terminal_table(summary)
    lines = text.splitlines()
    header = lines[0].split("  ")
    assert [h.strip() for h in header if h.strip()] == [
        "method",
        "mean over clients",
        "weighted by test samples",
        "worst 10% of clients",
        "gain over fedavg",
    ]
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    # fedavg: mean 65.00, weighted (5 + 18 + 14 + 32) / 100 = 69.00, worst 10% (1 of 4 clients) 50.00
    assert rows["fedavg"] == ["fedavg", "65.00", "69.00", "50.00", "-"]
    assert rows["fedse"] == ["fedse", "65.25", "69.30", "49.00", "+0.25", "(1/2/1)"]
    assert max(len(line) for line in lines) <= 100  # fits a terminal; the file keeps every column
    numbers = re.findall(r"[+-]?\d+\.\d+", "\n".join(lines[2:4]))
    assert numbers and all(len(n.split(".")[1]) == 2 for n in numbers)  # one precision throughout
    assert terminal_table(read_comparison(tmp_path / "out")) == text  # the same from the folder read back
    md = (tmp_path / "out" / "table.md").read_text()
    assert "personalized_mean_best_round" in md and "wall_s_per_run" in md  # the file keeps the full table
    gain_line = next(line for line in md.split("## Gain")[1].splitlines() if "fedse" in line)
    assert "+0.25" in gain_line and "0.2500" not in gain_line  # points, 2 decimals, as the accuracy cells
    gains_csv = (tmp_path / "out" / "gains.csv").read_text()
    assert "0.25" in gains_csv and "+0.25" not in gains_csv  # the CSV keeps the number as a number


def test_the_terminal_table_with_several_seeds_and_without_fedavg():
    from fedse.analysis.comparison import method_table, paired_gains, terminal_table

    runs = [_gained("fedavg", s, [0.5, 0.6, 0.7, 0.8]) for s in (0, 1)] + [
        _gained("fedse", 0, [0.6, 0.6, 0.7, 0.8]),
        _gained("fedse", 1, [0.5, 0.6, 0.7, 0.8]),
    ]
    text = terminal_table({"table": method_table(runs), "gains": paired_gains(runs)})
    # fedse: 67.50 (seed 0), 65.00 (seed 1): 66.25 ± 1.25
    assert "66.25 ± 1.25" in text and "mean ± std over seeds" in " ".join(text.split())
    alone = terminal_table({"table": method_table(runs[2:]), "gains": []})
    assert "gain over" not in alone.splitlines()[0]


def test_the_comparison_figures_name_the_setting_with_whole_rounds_and_no_global_model(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from fedse.analysis.comparison import clients_figure, per_client, round_figure
    from fedse.analysis.report import describe_split

    runs = [_gained("fedavg", 0, [0.5, 0.6, 0.7, 0.8]), _gained("fedse", 0, [0.49, 0.6, 0.72, 0.8])]
    setting = describe_split(tiny_config(partition={"num_clients": 20, "alpha": 0.1}))
    fig = round_figure(runs, setting)
    ax = fig.axes[0]
    assert ax.get_title().startswith("digits, Dirichlet(0.1), 20 clients: ")
    assert ax.get_xlabel() == "round" and "own test part" in ax.get_ylabel()
    locator = ax.xaxis.get_major_locator()
    assert isinstance(locator, MaxNLocator) and locator._integer
    assert all(float(t).is_integer() for t in locator() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["fedavg", "fedse"]
    plt.close(fig)
    fig = clients_figure(runs, per_client(runs), setting)
    ax = fig.axes[0]
    assert "digits, Dirichlet(0.1), 20 clients" in ax.get_title() and "4 clients" in ax.get_title()
    assert "FedAvg" in ax.get_xlabel() and "personalized" in ax.get_ylabel()
    words = " ".join([ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), *(t.get_text() for t in ax.texts)])
    words += " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "global" not in words.lower()
    assert "fedse (mean gain +0.25 points)" in [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)
    assert clients_figure(runs[1:], per_client(runs[1:])) is None  # no fedavg: no figure against it


def test_the_round_figure_shades_one_std_over_seeds_where_a_method_has_several():
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import to_rgb

    from fedse.analysis.comparison import round_figure

    def curve(*accuracies):
        return [{"round": n, "local_acc_mean": a} for n, a in enumerate(accuracies, start=1)]

    runs = [
        _run("fedavg", 0, curve(0.5, 0.6)),
        _run("fedavg", 1, curve(0.7, 0.8)),
        _run("fedse", 0, curve(0.6, 0.9)),
        _run("fedse", 1, curve(0.6, 0.7)),
    ]
    fig = round_figure(runs)
    ax = fig.axes[0]
    shades = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(shades) == len(ax.collections) == 2  # one per method
    # round 2: fedavg 0.6, 0.8 -> 0.7 ± 0.1; fedse 0.9, 0.7 -> 0.8 ± 0.1 (population std, as the tables)
    for shade, line, (lo, hi) in zip(shades, ax.get_lines(), [(0.6, 0.8), (0.7, 0.9)], strict=True):
        xy = shade.get_paths()[0].vertices
        at_two = xy[xy[:, 0] == 2, 1]
        assert (at_two.min(), at_two.max()) == (pytest.approx(lo), pytest.approx(hi))
        assert tuple(shade.get_facecolor()[0][:3]) == pytest.approx(to_rgb(line.get_color()))  # the line's colour
    assert ax.get_legend().get_title().get_text() == "method\n(shaded: ± 1 std over 2 seeds)"
    plt.close(fig)
    fig = round_figure([*runs, _run("fedse", 2, curve(0.6, 0.8))])  # seed counts differ: each label names its own
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["fedavg (2 seeds)", "fedse (3 seeds)"]
    assert ax.get_legend().get_title().get_text() == "method\n(shaded: ± 1 std over its seeds)"
    plt.close(fig)
    fig = round_figure([r for r in runs if r.seed == 0])  # one seed: no spread to shade
    ax = fig.axes[0]
    assert not ax.collections and ax.get_legend().get_title().get_text() == "method"
    plt.close(fig)
