"""nearfar.index: exact and approximate search, filters, thresholds, encoder binding,
persistence, erasure down to the bytes on disk, the hash-chained audit log, crashes.

Most tests use random unit vectors (the encoder is not the point); the ones about
binding an index to a run share one tiny trained run per module.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

from nearfar.cli import main  # noqa: E402
from nearfar.index import (  # noqa: E402
    DuplicateIdError,
    EncoderMismatchError,
    IndexLockedError,
    IndexStoreError,
    UnknownIdError,
    VectorIndex,
    build_index,
    erase,
    parse_where,
    weights_sha256,
)
from nearfar.index import store as store_mod  # noqa: E402
from nearfar.index.auditlog import AuditLog  # noqa: E402

SHA = "a" * 64
OTHER = "b" * 64
DIM = 16
TINY = ["trainer.steps=3", "encoder.widths=[16, 32, 64, 128]", "trainer.batch_size=32",
        "trainer.progress=false",
        'trainer.precision="fp32"', "trainer.channels_last=false", "eval.probe_epochs=2",
        "data.test_size=200"]


def unit(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_index(path: Path, kind: str = "flat", n: int = 300, seed: int = 0, **kw) -> tuple:
    x = unit(n, seed=seed)
    index = VectorIndex.create(path, dim=DIM, encoder={"weights_sha256": SHA}, kind=kind,
                               train_vectors=x if kind == "ivf" else None, actor="test", **kw)
    ids = [f"item-{i}" for i in range(n)]
    metas = [{"group": "ab"[i % 2], "subject": f"s{i % 7}", "n": i} for i in range(n)]
    index.add(ids, x, metas, encoder_sha256=SHA, actor="test")
    return index, x, ids


def top_ids(answer: dict, row: int = 0) -> list[str]:
    return [r["id"] for r in answer["results"][row]]


# ---------------------------------------------------------------------- search

def test_flat_search_is_exact(tmp_path):
    index, x, ids = make_index(tmp_path / "ix")
    q = unit(5, seed=1)
    ans = index.search(q, 10, encoder_sha256=SHA)
    scores = q @ x.T
    for r in range(5):
        expected = [ids[j] for j in np.argsort(-scores[r], kind="stable")[:10]]
        assert top_ids(ans, r) == expected
        got = [h["score"] for h in ans["results"][r]]
        np.testing.assert_allclose(got, np.sort(scores[r])[::-1][:10], atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_agree_with_exact(tmp_path, kind):
    index, x, ids = make_index(tmp_path / "ix", kind)
    q = unit(20, seed=2)
    ans = index.search(q, 10, encoder_sha256=SHA)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    recall = np.mean([len(set(top_ids(ans, r)) & {ids[j] for j in exact[r]}) / 10
                      for r in range(20)])
    assert recall >= 0.9


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_filters_restrict_results_exactly(tmp_path, kind):
    index, x, ids = make_index(tmp_path / "ix", kind)
    q = unit(3, seed=3)
    ans = index.search(q, 5, encoder_sha256=SHA, where={"group": "b", "subject": "s3"})
    allowed = [i for i in range(len(ids)) if i % 2 == 1 and i % 7 == 3]
    for r in range(3):
        expected = sorted(allowed, key=lambda j: -float(q[r] @ x[j]))[:5]
        assert top_ids(ans, r) == [ids[j] for j in expected]
        assert all(h["meta"]["group"] == "b" for h in ans["results"][r])
    assert index.search(q, 5, encoder_sha256=SHA, where={"group": "zz"})["results"] == [[]] * 3
    assert index.search(q, 5, encoder_sha256=SHA, where={"n": "3"})["results"][0] == []  # 3 != "3"
    with pytest.raises(ValueError, match="where.group"):
        index.search(q, 5, encoder_sha256=SHA, where={"group": ["a"]})


def test_parse_where():
    assert parse_where(['group == "a"', "label == 3", "ok=true", "name == bob"]) == \
        {"group": "a", "label": 3, "ok": True, "name": "bob"}
    with pytest.raises(ValueError, match="FIELD == VALUE"):
        parse_where(["group"])


def test_every_answer_carries_scores_threshold_and_encoder(tmp_path):
    index, x, ids = make_index(tmp_path / "ix", threshold=0.9, threshold_source="set explicitly")
    ans = index.search(x[:1], 50, encoder_sha256=SHA)
    assert ans["threshold"] == 0.9 and ans["encoder_sha256"] == SHA
    assert ans["threshold_source"] == "set explicitly"
    hits = ans["results"][0]
    assert hits[0]["id"] == ids[0] and hits[0]["needs_review"] is False
    assert all(h["needs_review"] == (h["score"] < 0.9) for h in hits)
    assert any(h["needs_review"] for h in hits)


def test_other_encoder_versions_are_refused(tmp_path):
    index, x, _ = make_index(tmp_path / "ix")
    with pytest.raises(EncoderMismatchError, match="encoder version mismatch"):
        index.search(x[:1], 5, encoder_sha256=OTHER)
    with pytest.raises(EncoderMismatchError, match="not comparable"):
        index.add(["new"], x[:1], encoder_sha256=OTHER, actor="test")
    with pytest.raises(EncoderMismatchError):
        index.search(x[:1], 5, encoder_sha256=None)


def test_bad_inputs_are_clear_errors(tmp_path):
    index, x, _ = make_index(tmp_path / "ix")
    with pytest.raises(DuplicateIdError, match="already indexed"):
        index.add(["item-3"], x[:1], encoder_sha256=SHA, actor="t")
    with pytest.raises(DuplicateIdError, match="more than once"):
        index.add(["n1", "n1"], x[:2], encoder_sha256=SHA, actor="t")
    with pytest.raises(IndexStoreError, match=r"shape \(N, 16\)"):
        index.add(["n1"], np.ones((1, 8)), encoder_sha256=SHA, actor="t")
    with pytest.raises(IndexStoreError, match="finite"):
        index.add(["n1"], np.full((1, DIM), np.nan), encoder_sha256=SHA, actor="t")
    with pytest.raises(IndexStoreError, match="k: expected"):
        index.search(x[:1], 0, encoder_sha256=SHA)
    with pytest.raises(UnknownIdError, match="nothing to delete"):
        index.delete(["nope"], actor="t")
    with pytest.raises(IndexStoreError, match="not empty"):
        VectorIndex.create(tmp_path / "ix", dim=DIM, encoder={"weights_sha256": SHA})


# ---------------------------------------------------------------------- persistence

@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_reload_gives_the_same_state(tmp_path, kind):
    index, x, ids = make_index(tmp_path / "ix", kind)
    extra = unit(5, seed=9)
    for i in range(5):                                     # write-ahead path
        index.add([f"extra-{i}"], extra[i:i + 1], [{"group": "c"}], encoder_sha256=SHA,
                  actor="t")
    index.delete(["item-4"], actor="t")
    q = unit(4, seed=4)
    before = index.search(q, 10, encoder_sha256=SHA, where={"group": "a"})
    state = (index.index_hash, index.ids(), index.info()["log"])
    index.close()
    again = VectorIndex.open(tmp_path / "ix")
    assert (again.index_hash, again.ids(), again.info()["log"]) == state
    after = again.search(q, 10, encoder_sha256=SHA, where={"group": "a"})
    if kind == "flat":
        assert after == before
    else:
        assert [set(top_ids(after, r)) for r in range(4)] == \
            [set(top_ids(before, r)) for r in range(4)]
    assert again.verify(deep=True)["ok"]


def test_one_writer_at_a_time(tmp_path):
    index, _, _ = make_index(tmp_path / "ix")
    with pytest.raises(IndexLockedError, match="another process"):
        VectorIndex.open(tmp_path / "ix")
    assert len(VectorIndex.open(tmp_path / "ix", writable=False)) == 300
    index.close()
    VectorIndex.open(tmp_path / "ix").close()


def test_changed_files_are_refused(tmp_path):
    index, _, _ = make_index(tmp_path / "ix")
    index.add(["n1"], unit(1, seed=5), [{"group": "a"}], encoder_sha256=SHA, actor="t")
    index.close()
    wal = tmp_path / "ix" / "wal.jsonl"
    wal.write_bytes(wal.read_bytes().replace(b'"group":"a"', b'"group":"z"', 1))
    with pytest.raises(IndexStoreError, match="does not match its checksum"):
        VectorIndex.open(tmp_path / "ix")
    (tmp_path / "ix" / "wal.jsonl").unlink()
    with pytest.raises(IndexStoreError, match="write-ahead log .* was removed or cut"):
        VectorIndex.open(tmp_path / "ix")       # an acknowledged add would be lost

    index, _, _ = make_index(tmp_path / "iy")
    index.delete(["item-0"], actor="t")          # items now live in the snapshot
    index.close()
    items = next((tmp_path / "iy").glob("items-*.jsonl"))
    items.write_bytes(items.read_bytes().replace(b'"group":"a"', b'"group":"z"', 1))
    with pytest.raises(IndexStoreError, match="does not match the manifest"):
        VectorIndex.open(tmp_path / "iy")


# ---------------------------------------------------------------------- erasure

def _all_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_deleted_vectors_are_in_no_saved_file(tmp_path, kind):
    folder = tmp_path / "ix"
    index, x, ids = make_index(folder, kind)
    late = unit(3, seed=7)
    index.add(["late-0", "late-1", "late-2"], late,
              [{"group": "a", "secret": f"SECRET-{i}"} for i in range(3)],
              encoder_sha256=SHA, actor="t")                  # only in the write-ahead log
    gone = dict(zip(["item-10", "late-1"], index.vectors_of(["item-10", "late-1"])))
    forms = {k: [v.tobytes(), base64.b64encode(v.tobytes())] for k, v in gone.items()}
    for item_id, (raw, b64) in forms.items():              # the bytes exist before deletion
        assert any(raw in b or b64 in b for b in _all_bytes(folder).values()), item_id
    cached = index.search(np.stack(list(gone.values())), 3, encoder_sha256=SHA)
    assert top_ids(cached, 0)[0] == "item-10" and top_ids(cached, 1)[0] == "late-1"

    report = erase(index, list(gone), actor="test")
    assert report["deleted"] == list(gone) and report["cache_entries_dropped"] >= 2

    files = _all_bytes(folder)
    assert "wal.jsonl" not in files
    for name, data in files.items():
        for item_id, (raw, b64) in forms.items():
            assert raw not in data, f"{item_id}'s vector is still in {name}"
            assert b64 not in data, f"{item_id}'s vector (base64) is still in {name}"
        assert b"SECRET-1" not in data, f"late-1's metadata is still in {name}"
        if name != "lock":
            assert b'"late-1"' not in data, f"late-1's id in clear in {name}"
    # never in any search, from any angle
    queries = np.stack(list(gone.values()))
    for where in ({}, {"group": "a"}, {"subject": "s3"}):
        ans = index.search(queries, len(index), encoder_sha256=SHA, where=where)
        assert not {h["id"] for row in ans["results"] for h in row} & set(gone)
    index.close()
    again = VectorIndex.open(folder)
    assert "item-10" not in again and "late-1" not in again and "late-0" in again
    assert again.verify(deep=True)["ok"]


def test_hnsw_rebuilds_its_graph_when_many_nodes_are_deleted(tmp_path):
    index, x, ids = make_index(tmp_path / "ix", "hnsw", params={"rebuild_fraction": 0.05})
    index.delete(ids[:5], actor="t")
    assert index.info()["hnsw_tombstones"] == 5
    index.delete(ids[5:20], actor="t")
    assert index.info()["hnsw_tombstones"] == 0
    ans = index.search(x[:30], 5, encoder_sha256=SHA)
    assert not set(ids[:20]) & {h["id"] for row in ans["results"] for h in row}
    assert top_ids(ans, 25)[0] == ids[25]


def test_delete_by_subject(tmp_path):
    index, _, ids = make_index(tmp_path / "ix")
    report = erase(index, subjects=["s3"], actor="t")
    assert report["subjects"] == {"s3": len([i for i in range(300) if i % 7 == 3])}
    assert all(not it.endswith(tuple(f"-{i}" for i in range(300) if i % 7 == 3))
               for it in index.ids())
    entry = json.loads((tmp_path / "ix" / "audit.jsonl").read_text().splitlines()[-1])
    assert entry["details"]["subjects_sha256"] == [index.hash_subject("s3")]
    assert report["subject_training_data"]["s3"]["in_training_data"] == "unknown"


# ---------------------------------------------------------------------- audit log

def _log_lines(folder: Path) -> list[str]:
    return (folder / "audit.jsonl").read_text().splitlines()


def _write_lines(folder: Path, lines: list[str]) -> None:
    (folder / "audit.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def logged(tmp_path):
    folder = tmp_path / "ix"
    index, x, ids = make_index(folder)
    index.add(["n1"], unit(1, seed=5), encoder_sha256=SHA, actor="alice")
    index.delete(["item-1"], actor="bob")
    index.add(["n2"], unit(1, seed=6), encoder_sha256=SHA, actor="carol")
    index.close()
    return folder


def test_log_records_every_change_without_content(logged, capsys):
    entries = [json.loads(line) for line in _log_lines(logged)]
    assert [e["action"] for e in entries] == ["create", "add", "add", "delete", "add"]
    assert [e["actor"] for e in entries[-3:]] == ["alice", "bob", "carol"]
    for a, b in zip(entries, entries[1:]):
        assert b["prev"] == a["hash"] and b["index_hash_before"] == a["index_hash_after"]
    text = (logged / "audit.jsonl").read_text()
    assert "item-1" not in text and '"n1"' not in text                 # ids only hashed
    index = VectorIndex.open(logged, writable=False)
    assert entries[3]["ids_sha256"] == [index.hash_id("item-1")]
    assert entries[-1]["index_hash_after"] == index.index_hash
    assert main(["index", "verify-log", str(logged)]) == 0
    assert "intact (5 entries" in capsys.readouterr().out


def _edit(lines):
    e = json.loads(lines[3])
    e["actor"] = "mallory"
    lines[3] = json.dumps(e, sort_keys=True, separators=(",", ":"))
    return lines


def _edit_and_rehash(lines):
    from nearfar.index.auditlog import entry_hash
    e = json.loads(lines[3])
    e["actor"] = "mallory"
    e["hash"] = entry_hash(e)
    lines[3] = json.dumps(e, sort_keys=True, separators=(",", ":"))
    return lines


@pytest.mark.parametrize("tamper,expect", [
    (_edit, "was edited"),
    (_edit_and_rehash, "prev does not match"),
    (lambda ls: ls[:2] + ls[3:], "seq 4 where 3 was expected"),
    (lambda ls: ls[:2] + [ls[3], ls[2]] + ls[4:], "reordered"),
    (lambda ls: ls[:-1], "cut from the end"),
    (lambda ls: ls[:-1] + [ls[-1][:40]], "not a JSON object"),
])
def test_verify_log_detects_tampering(logged, tamper, expect, capsys):
    _write_lines(logged, tamper(_log_lines(logged)))
    assert main(["index", "verify-log", str(logged)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and expect in out


# ---------------------------------------------------------------------- crashes

def test_committed_add_whose_log_line_was_lost_is_restored(tmp_path, monkeypatch):
    index, x, _ = make_index(tmp_path / "ix")

    def crash(self, entry):
        raise OSError("simulated crash before the log write")
    monkeypatch.setattr(AuditLog, "append", crash)
    with pytest.raises(OSError):
        index.add(["n1"], unit(1, seed=5), encoder_sha256=SHA, actor="t")   # not acknowledged
    monkeypatch.undo()
    index.close()
    assert main(["index", "verify-log", str(tmp_path / "ix")]) == 1       # the gap is visible
    again = VectorIndex.open(tmp_path / "ix")                              # ... and repaired
    assert "n1" in again and again.verify()["ok"]


def test_crash_during_delete_keeps_erasure_and_log(tmp_path, monkeypatch):
    index, x, _ = make_index(tmp_path / "ix")
    monkeypatch.setattr(AuditLog, "append", lambda self, e: (_ for _ in ()).throw(OSError()))
    with pytest.raises(OSError):
        index.delete(["item-7"], actor="t")
    monkeypatch.undo()
    index.close()
    again = VectorIndex.open(tmp_path / "ix")
    assert "item-7" not in again and again.verify()["ok"]
    assert json.loads(_log_lines(tmp_path / "ix")[-1])["action"] == "delete"


def test_torn_writes_are_dropped(tmp_path):
    index, x, _ = make_index(tmp_path / "ix")
    index.add(["n1"], unit(1, seed=5), encoder_sha256=SHA, actor="t")
    index.close()
    with open(tmp_path / "ix" / "wal.jsonl", "ab") as f:       # a record cut mid-write
        f.write(b'{"record":{"seq":4,"entry":{')
    again = VectorIndex.open(tmp_path / "ix")
    assert "n1" in again and len(again) == 301 and again.verify()["ok"]
    again.add(["n2"], unit(1, seed=6), encoder_sha256=SHA, actor="t")
    again.close()
    assert "n2" in VectorIndex.open(tmp_path / "ix", writable=False)


CRASH_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from nearfar.index import VectorIndex
    index = VectorIndex.open(sys.argv[1])
    rng = np.random.default_rng(0)
    for i in range(100000):
        v = rng.standard_normal((1, 16)).astype("float32")
        index.add([f"crash-{i}"], v, [{"i": i}], encoder_sha256="a" * 64, actor="crash")
        print(f"ACK crash-{i}", flush=True)
""")


def test_sigkill_mid_batch_loses_no_acknowledged_add(tmp_path):
    folder = tmp_path / "ix"
    make_index(folder, n=50)[0].close()
    script = tmp_path / "adder.py"
    script.write_text(CRASH_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE,
                            text=True)
    acked = []
    deadline = time.monotonic() + 60
    while len(acked) < 40 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(line.split()[1])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(acked) >= 40, "the adder did not get going"
    index = VectorIndex.open(folder)            # loadable; repairs a torn tail if any
    missing = [i for i in acked if i not in index]
    assert not missing, f"acknowledged adds lost: {missing[:5]}"
    assert index.verify(deep=True)["ok"]
    assert len(index) >= 50 + len(acked)


# ---------------------------------------------------------------------- bound to a run

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    # one tiny run per test session (test_serve reuses it when it finds it complete)
    d = tmp_path_factory.getbasetemp() / "nearfar-tiny-run"
    if not (d / "card.json").exists():
        import nearfar.api
        shutil.rmtree(d, ignore_errors=True)
        nearfar.api.train(None, overrides=TINY, run_dir=d)
    return d


def fork_encoder(run: Path, dst: Path) -> Path:
    """A copy of the run with slightly changed weights: another encoder version."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("step-*"))
    weights = load_file(dst / "weights.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01 * torch.ones_like(weights[name])
    save_file(weights, dst / "weights.safetensors")
    sha = weights_sha256(dst)
    ckpt = json.loads((dst / "checkpoint.json").read_text())
    ckpt["weights"].update(sha256=sha, bytes=(dst / "weights.safetensors").stat().st_size)
    ckpt["latest"], ckpt["checkpoints"] = None, []
    (dst / "checkpoint.json").write_text(json.dumps(ckpt))
    card = json.loads((dst / "card.json").read_text())
    card["encoder"]["weights_sha256"] = sha
    (dst / "card.json").write_text(json.dumps(card))
    return dst


@pytest.fixture(scope="module")
def split_ids(run_dir):
    from nearfar.api import load_source, split_source
    from nearfar.index.build import run_data_table

    table = run_data_table(run_dir)
    train, test = split_source(load_source(table), table, 0)
    return train, test


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, split_ids):
    """24 PNGs (12 from the training split, 12 held out) with group and subject columns."""
    from PIL import Image

    train, test = split_ids
    folder = tmp_path_factory.mktemp("manifest")
    rows = ["path,id,group,subject,label"]
    for part, ds in (("train", train), ("test", test)):
        for i in range(12):
            name = f"{part}-{i}.png"
            Image.fromarray(ds.images[i, 0].numpy(), mode="L").save(folder / name)
            rows.append(f"{name},{part}-{i},{'ab'[i % 2]},{part}-subject-{i % 3},"
                        f"{int(ds.labels[i])}")
    (folder / "items.csv").write_text("\n".join(rows) + "\n")
    return folder / "items.csv"


def test_build_binds_the_index_to_the_run(run_dir, split_ids, tmp_path, capsys):
    out = tmp_path / "ix"
    assert main(["index", "build", str(run_dir), "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 5000 and info["kind"] == "flat" and info["dim"] == 128
    assert info["encoder"]["weights_sha256"] == weights_sha256(run_dir)
    assert info["encoder"]["weights_sha256"] == \
        json.loads((run_dir / "card.json").read_text())["encoder"]["weights_sha256"]
    assert info["threshold"]["source"].startswith("configured default")
    assert info["training_record"]["status"] == "reconstructed"

    assert main(["index", "query", str(out), "--like", "5", "-k", "4", "--where",
                 "label == 3", "--json"]) == 0
    ans = json.loads(capsys.readouterr().out)
    assert len(ans["results"][0]) == 4 and all(h["meta"]["label"] == 3
                                               for h in ans["results"][0])

    # erasure says what can be known about the training data
    train, test = (str(part.meta["id"][0]) for part in split_ids)
    assert main(["index", "delete", str(out), "--id", train, "--id", test, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    found = {r["id"]: r for r in report["training_data"]}
    assert found[train]["in_training_data"] == "yes"
    assert found[test]["in_training_data"] == "no" and "held-out" in found[test]["basis"]
    assert "does not remove its influence" in report["note"]
    assert main(["index", "verify-log", str(out), "--deep"]) == 0


def test_manifest_index_filters_subjects_and_membership(run_dir, manifest, tmp_path, capsys):
    out = tmp_path / "ix"
    index = build_index(run_dir, out, data=str(manifest), kind="flat", actor="t")
    assert len(index) == 24 and index.get("train-0")["meta"]["group"] == "a"
    ans = index.search(index.vectors_of(["train-1"]), 5, encoder_sha256=index.encoder_sha256,
                       where={"group": "b"})
    assert top_ids(ans)[0] == "train-1" and all(h["meta"]["group"] == "b"
                                                for h in ans["results"][0])
    report = erase(index, ["train-2", "test-2"], actor="t")
    found = {r["id"]: r for r in report["training_data"]}
    # not the training dataset's ids, but identical pixels to a training image
    assert found["train-2"]["in_training_data"] == "yes"
    assert "identical" in found["train-2"]["basis"]
    assert found["test-2"]["in_training_data"] == "no"
    report = erase(index, subjects=["train-subject-1"], actor="t")
    assert report["subjects"] == {"train-subject-1": 4}
    assert report["subject_training_data"]["train-subject-1"]["in_training_data"] == "unknown"
    index.close()


def test_query_images_with_the_run_and_refuse_another_encoder(run_dir, manifest, tmp_path,
                                                               capsys):
    out = tmp_path / "ix"
    build_index(run_dir, out, data=str(manifest), actor="t").close()
    image = manifest.parent / "test-3.png"
    assert main(["index", "query", str(out), "--run", str(run_dir), "--image", str(image),
                 "-k", "3", "--json"]) == 0
    ans = json.loads(capsys.readouterr().out)
    assert ans["results"][0][0]["id"] == "test-3"
    assert ans["results"][0][0]["score"] == pytest.approx(1.0, abs=1e-4)

    other = fork_encoder(run_dir, tmp_path / "run-v2")
    assert main(["index", "query", str(out), "--run", str(other), "--image", str(image)]) == 2
    assert "encoder version mismatch" in capsys.readouterr().err
    from nearfar.index import bind_run
    bound = bind_run(other)
    with VectorIndex.open(out) as index:
        with pytest.raises(EncoderMismatchError):
            index.add(["x"], bound.embed(np.zeros((1, 1, 28, 28), np.uint8)),
                      encoder_sha256=bound.weights_sha256, actor="t")


def test_threshold_is_the_audits_t_star_when_present(run_dir, manifest, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("step-*"))
    (run / "audit.json").write_text(json.dumps({"threshold": {"t_star": 0.83, "fpr": 0.01}}))
    index = build_index(run, tmp_path / "ix", data=str(manifest), actor="t")
    assert index.threshold == 0.83 and "audit.json" in index.threshold_source
    index.close()
    index = build_index(run, tmp_path / "ix2", data=str(manifest), threshold=0.2, actor="t")
    assert index.threshold == 0.2 and "overrides" in index.threshold_source
    ans = index.search(index.vectors_of(["train-0"]), 24, encoder_sha256=index.encoder_sha256)
    assert ans["threshold"] == 0.2
    assert all(h["needs_review"] == (h["score"] < 0.2) for h in ans["results"][0])
    index.close()


def test_ivf_and_hnsw_build_from_a_run(run_dir, manifest, tmp_path):
    for kind in ("ivf", "hnsw"):
        index = build_index(run_dir, tmp_path / kind, data=str(manifest), kind=kind, actor="t")
        ans = index.search(index.vectors_of(["test-5"]), 3,
                           encoder_sha256=index.encoder_sha256)
        assert top_ids(ans)[0] == "test-5"
        index.close()


def test_store_module_constants_are_sane():
    assert store_mod.BULK_ADD > 1 and store_mod.EXACT_FILTER_MAX >= 1
