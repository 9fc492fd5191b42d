"""Private state on disk: atomic across a kill, checksummed, bit-identical on restore."""

import subprocess
import sys
import textwrap

import pytest
import torch

from fedse.state import StateCorruptError, StateStore, digest


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "layer1.0.se.fc1.weight": torch.randn(4, 16, generator=g),
        "layer1.0.se.fc1.bias": torch.randn(4, generator=g),
    }


def test_round_trip_is_bit_identical(tmp_path):
    store = StateStore(tmp_path)
    assert store.load() is None  # first start: no state yet
    saved = _tensors(0)
    store.save(saved, {"round": 3})
    tensors, meta = StateStore(tmp_path).load()  # a new process would do the same
    assert meta == {"round": 3}
    assert digest(tensors) == digest(saved)
    assert all(torch.equal(tensors[k], saved[k]) for k in saved)


def test_kill_between_write_and_rename_leaves_old_file_intact(tmp_path):
    store = StateStore(tmp_path)
    old = _tensors(0)
    store.save(old, {"round": 1})
    # A real process writes the new state's bytes, fsyncs them, and is SIGKILLed before the rename.
    script = textwrap.dedent(f"""
        import os, signal
        from fedse.io import atomic_open
        with atomic_open({str(store.path)!r}, "wb") as handle:
            handle.write(b"new state that never lands" * 1000)
            handle.flush(); os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    tensors, meta = store.load()
    assert meta == {"round": 1} and digest(tensors) == digest(old)


def test_checksum_mismatch_is_a_clear_error(tmp_path):
    store = StateStore(tmp_path)
    store.save(_tensors(0))
    raw = bytearray(store.path.read_bytes())
    raw[-10] ^= 0xFF  # flip bits in the payload
    store.path.write_bytes(bytes(raw))
    with pytest.raises(StateCorruptError, match="checksum mismatch.*delete it to start this client"):
        store.load()
    store.path.write_bytes(b"garbage")
    with pytest.raises(StateCorruptError, match="not a fedse state file"):
        store.load()


def test_a_checksummed_payload_that_is_not_tensors_is_refused_unrun(tmp_path):
    # The checksum only says the file is what was written; a writer with access could write a
    # pickle that runs code. weights_only refuses it, and that is a StateCorruptError too.
    import hashlib
    import json
    import pickle

    from fedse.state import MAGIC

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "marker"), "w"))

    store = StateStore(tmp_path)
    payload = pickle.dumps({"w": Evil()})
    header = {"format": 1, "sha256": hashlib.sha256(payload).hexdigest(), "length": len(payload), "meta": {}}
    store.path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + payload)
    with pytest.raises(StateCorruptError, match="not a plain mapping of tensors"):
        store.load()
    assert not (tmp_path / "marker").exists()


def test_context_state_is_one_packed_array_read_back_bit_identically():
    import pickle

    from flwr.app import Context, RecordDict

    from fedse.state import LAYOUT_KEY, PRIVATE_KEY, load_private, save_private

    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    saved = {**_tensors(1), "bn.num_batches_tracked": torch.tensor(12, dtype=torch.int64)}
    assert load_private(ctx, saved) is None  # first round
    save_private(ctx, saved)
    ctx = pickle.loads(pickle.dumps(ctx))  # as it comes back from a Ray actor
    record = ctx.state.array_records[PRIVATE_KEY]
    assert list(record.keys()) == ["packed"]  # one Array per client, not one per tensor
    assert record["packed"].shape == (4 * 16 * 4 + 4 * 4 + 8,)  # the tensors' bytes, nothing else
    loaded = load_private(ctx, {k: torch.zeros_like(v) for k, v in saved.items()})
    assert list(loaded) == list(saved)
    assert all(torch.equal(loaded[k], saved[k]) and loaded[k].dtype == saved[k].dtype for k in saved)
    other = {"layer1.0.se.fc1.weight": torch.zeros(4, 8), "layer1.0.se.fc1.bias": torch.zeros(4)}
    with pytest.raises(ValueError, match="does not match this run's private keys"):
        load_private(ctx, other)  # another model or policy mid-run
    assert LAYOUT_KEY in ctx.state.config_records


def test_reports_get_the_umask_permissions_private_state_owner_only(tmp_path):
    import os
    import stat

    from fedse.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.json", "{}")
        StateStore(tmp_path).save(_tensors(0))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644  # as a plain open() would
    assert stat.S_IMODE((tmp_path / StateStore.FILENAME).stat().st_mode) == 0o600  # a client's private tensors
