"""nearfar.serve over real HTTP on loopback (uvicorn in a thread or a subprocess, httpx).

Keys and roles, refusals, a deleted item never coming back, encoder versions,
validation and size limits, the audit trail of every mutation, and a server killed
with SIGKILL in the middle of a stream of adds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from nearfar.cli import main  # noqa: E402
from nearfar.index import EncoderMismatchError, VectorIndex, build_index, weights_sha256  # noqa: E402
from nearfar.serve import KeyStore  # noqa: E402
from nearfar.serve.server import BackgroundServer, open_service  # noqa: E402

TINY = ["trainer.steps=3", "encoder.widths=[16, 32, 64, 128]", "trainer.batch_size=32",
        "trainer.progress=false",
        'trainer.precision="fp32"', "trainer.channels_last=false", "eval.probe_epochs=2",
        "data.test_size=200"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    # one tiny run per test session (test_index reuses it when it finds it complete)
    d = tmp_path_factory.getbasetemp() / "nearfar-tiny-run"
    if not (d / "card.json").exists():
        import nearfar.api
        shutil.rmtree(d, ignore_errors=True)
        nearfar.api.train(None, overrides=TINY, run_dir=d)
    return d


@pytest.fixture(scope="module")
def images():
    from nearfar.data import load_mnist5k
    return load_mnist5k().images[:80].numpy()           # (80, 1, 28, 28) uint8


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, images):
    from PIL import Image

    folder = tmp_path_factory.mktemp("data")
    rows = ["path,id,group,subject"]
    for i in range(40):
        Image.fromarray(images[i, 0], mode="L").save(folder / f"{i}.png")
        rows.append(f"{i}.png,img-{i},{'ab'[i % 2]},person-{i % 5}")
    (folder / "items.csv").write_text("\n".join(rows) + "\n")
    return folder / "items.csv"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    store = KeyStore(path, create=True)
    out = {role: store.add(role, f"test-{role}")[0] for role in ("reader", "writer", "admin")}
    out["revoked"], record = store.add("admin", "gone")
    store.revoke(record.key_id)
    out["path"] = path
    return out


@pytest.fixture(scope="module")
def service(run_dir, manifest, keys, tmp_path_factory):
    folder = tmp_path_factory.mktemp("svc") / "index"
    build_index(run_dir, folder, data=str(manifest), actor="test").close()
    app, index = open_service(folder, run_dir, keys["path"], max_body_bytes=1 << 20,
                              max_batch=32)
    with BackgroundServer(app) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client, index, folder
    index.close()


def h(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def ids_in(answer: dict) -> set[str]:
    return {hit["id"] for row in answer["results"] for hit in row}


# ---------------------------------------------------------------------- keys and roles

ENDPOINTS = [("POST", "/search", {"vectors": [[0.1] * 128], "encoder_sha256": "0" * 64}),
             ("POST", "/embed", {"images": [[[[0] * 28] * 28]]}),
             ("POST", "/items", {"items": [{"id": "x", "vector": [0.1] * 128}]}),
             ("DELETE", "/items/img-1", None), ("DELETE", "/subjects/person-1", None),
             ("GET", "/card", None), ("GET", "/log/verify", None)]


def test_health_and_openapi_need_no_key(service):
    client, _, _ = service
    assert client.get("/health").json() == {"status": "ok"}
    schema = client.get("/openapi.json").json()
    assert {"/embed", "/search", "/items", "/items/{item_id}", "/card", "/health"} <= \
        set(schema["paths"])
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("method,path,body", ENDPOINTS)
def test_missing_wrong_or_revoked_keys_are_refused(service, keys, method, path, body):
    client, index, _ = service
    n = len(index)
    reader = keys["reader"]
    wrong = [None, "nope", reader[:-3] + "xyz", "nfk_00000000_" + reader.split("_", 2)[2],
             keys["revoked"]]
    for key in wrong:
        headers = {} if key is None else h(key)
        r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (key, r.text)
        assert "API key" in r.json()["error"]
    r = client.request(method, path, json=body, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert len(index) == n


def test_roles(service, keys, images):
    client, index, _ = service
    img = images[50:51].tolist()
    assert client.post("/search", json={"images": img, "k": 2}, headers=h(keys["reader"])) \
        .status_code == 200
    assert client.post("/embed", json={"images": img}, headers=h(keys["reader"])).status_code == 200
    assert client.get("/card", headers=h(keys["reader"])).status_code == 200
    for path_method in (("POST", "/items"), ("DELETE", "/items/img-1")):
        r = client.request(*path_method, json={"items": [{"id": "r1", "image": img[0]}]}
                           if path_method[0] == "POST" else None, headers=h(keys["reader"]))
        assert r.status_code == 403 and "needs 'writer'" in r.json()["error"]
    for method, path in (("DELETE", "/subjects/person-1"), ("GET", "/log/verify")):
        r = client.request(method, path, headers=h(keys["writer"]))
        assert r.status_code == 403 and "needs 'admin'" in r.json()["error"]
    assert "img-1" in index
    assert client.get("/log/verify", headers=h(keys["admin"])).json()["ok"] is True


# ---------------------------------------------------------------------- behaviour

def test_embed_and_search_answers(service, keys, images):
    client, index, _ = service
    r = client.post("/embed", json={"images": images[:3].tolist()}, headers=h(keys["reader"]))
    body = r.json()
    z = np.array(body["embeddings"])
    assert z.shape == (3, 128) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    assert body["encoder_sha256"] == index.encoder_sha256
    r = client.post("/search", json={"images": images[:2].tolist(), "k": 5,
                                     "where": {"group": "b"}}, headers=h(keys["reader"]))
    ans = r.json()
    assert ans["threshold"] == index.threshold and ans["encoder_sha256"] == index.encoder_sha256
    assert ans["results"][1][0]["id"] == "img-1"                 # itself, in group b
    for row in ans["results"]:
        assert all(hit["meta"]["group"] == "b" for hit in row)
        assert all(hit["needs_review"] == (hit["score"] < ans["threshold"]) for hit in row)
    card = client.get("/card", headers=h(keys["reader"])).json()
    assert card["card"]["encoder"]["weights_sha256"] == index.encoder_sha256


def test_added_then_deleted_item_never_comes_back(service, keys, images):
    client, index, folder = service
    w, r = h(keys["writer"]), h(keys["reader"])
    new_image = images[60:61]
    vec = np.random.default_rng(0).standard_normal(128)
    res = client.post("/items", headers=w, json={
        "items": [{"id": "new-img", "image": new_image[0].tolist(),
                   "meta": {"group": "c", "note": "PRIVATE-NOTE"}},
                  {"id": "new-vec", "vector": vec.tolist(), "meta": {"group": "c"}}],
        "encoder_sha256": index.encoder_sha256})
    assert res.status_code == 200, res.text
    found = client.post("/search", headers=r, json={"images": new_image.tolist(), "k": 1}).json()
    assert found["results"][0][0]["id"] == "new-img"
    stored = index.vectors_of(["new-img"])[0].tobytes()

    gone = client.delete("/items/new-img", headers=w)
    assert gone.status_code == 200 and gone.json()["deleted"] == ["new-img"]
    assert gone.json()["training_data"][0]["in_training_data"] in ("yes", "no")
    assert client.delete("/items/new-img", headers=w).status_code == 404

    everything = len(index) + 5
    probes = [{"images": new_image.tolist()},
              {"images": new_image.tolist(), "where": {"group": "c"}},
              {"vectors": [vec.tolist()], "encoder_sha256": index.encoder_sha256},
              {"vectors": [np.frombuffer(stored, np.float32).tolist()],
               "encoder_sha256": index.encoder_sha256}]
    for probe in probes:
        ans = client.post("/search", headers=r, json={**probe, "k": everything}).json()
        assert "new-img" not in ids_in(ans)
    assert "new-vec" in ids_in(client.post("/search", headers=r, json={
        "vectors": [vec.tolist()], "encoder_sha256": index.encoder_sha256, "k": 1}).json())
    for p in folder.iterdir():
        data = p.read_bytes()
        assert stored not in data and b"PRIVATE-NOTE" not in data, p.name

    log = [json.loads(line) for line in (folder / "audit.jsonl").read_text().splitlines()]
    writer_id = keys["writer"].split("_")[1]
    assert [e["action"] for e in log[-2:]] == ["add", "delete"]
    assert all(f"key:{writer_id}" in e["actor"] for e in log[-2:])
    assert log[-1]["ids_sha256"] == [index.hash_id("new-img")]
    assert "new-img" not in (folder / "audit.jsonl").read_text()


def test_delete_by_subject_is_admin_only_and_complete(service, keys, images):
    client, index, _ = service
    r = client.delete("/subjects/person-4", headers=h(keys["admin"]))
    assert r.status_code == 200
    assert r.json()["subjects"] == {"person-4": 8}
    ans = client.post("/search", headers=h(keys["reader"]),
                      json={"images": images[:40].tolist()[:32], "k": 40}).json()
    assert not {f"img-{i}" for i in range(4, 40, 5)} & ids_in(ans)


def test_other_encoder_versions_are_refused(service, keys, run_dir, tmp_path, capsys):
    client, index, folder = service
    other = "f" * 64
    r = client.post("/search", headers=h(keys["reader"]),
                    json={"vectors": [[0.1] * 128], "encoder_sha256": other})
    assert r.status_code == 409 and "encoder version mismatch" in r.json()["error"]
    r = client.post("/items", headers=h(keys["writer"]),
                    json={"items": [{"id": "v", "vector": [0.1] * 128}],
                          "encoder_sha256": other})
    assert r.status_code == 409 and "v" not in index
    r = client.post("/search", headers=h(keys["reader"]), json={"vectors": [[0.1] * 128]})
    assert r.status_code == 422 and "encoder_sha256" in r.json()["error"]

    fork = fork_encoder(run_dir, tmp_path / "run-v2")
    copy = tmp_path / "index-copy"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("lock"))
    with pytest.raises(EncoderMismatchError, match="service's encoder"):
        open_service(copy, fork, keys["path"])
    assert main(["serve", str(copy), "--run", str(fork), "--keys", str(keys["path"]),
                 "--port", "0"]) == 2
    assert "encoder version mismatch" in capsys.readouterr().err


@pytest.mark.parametrize("body,status,message", [
    ({"vectors": [[0.1] * 128], "encoder_sha256": "x", "k": 0}, 422, "k: Input should be"),
    ({"vectors": [[0.1] * 128], "encoder_sha256": "x", "k": 5000}, 422, "k: Input should be"),
    ({"images": [[[[0] * 27] * 28]]}, 422, "expected images of shape (1, 28, 28)"),
    ({"images": [[[[300] * 28] * 28]]}, 422, "integers in 0..255"),
    ({"images": [[[[0.5] * 28] * 28]], "pixel_range": "0-1", "k": 1}, 200, None),
    ({"images": [[[[0] * 28] * 28]], "vectors": [[0.1] * 128]}, 422, "either images or vectors"),
    ({"vectors": [[0.1] * 128], "encoder_sha256": "x", "colour": 1}, 422, "colour"),
    ({"vectors": [[0.1] * 128], "encoder_sha256": "x", "where": {"g": [1]}}, 422, "where.g"),
    ({"vectors": [[0.1] * 128] * 33, "encoder_sha256": "x"}, 422, "at most 32 per request"),
])
def test_validation_errors_are_4xx_with_a_clear_message(service, keys, body, status, message):
    client, index, _ = service
    body = {k: (index.encoder_sha256 if v == "x" and k == "encoder_sha256" else v)
            for k, v in body.items()}
    r = client.post("/search", json=body, headers=h(keys["reader"]))
    assert r.status_code == status, r.text
    if message:
        assert message in r.json()["error"]


def test_other_request_errors(service, keys):
    client, index, _ = service
    w = h(keys["writer"])
    r = client.post("/search", content=b"{not json", headers={**h(keys["reader"]),
                                                             "content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]
    r = client.post("/items", json={"items": [{"id": "img-2", "vector": [0.1] * 128}],
                                    "encoder_sha256": index.encoder_sha256}, headers=w)
    assert r.status_code == 409 and "already indexed" in r.json()["error"]
    r = client.post("/items", json={"items": []}, headers=w)
    assert r.status_code == 422 and "items" in r.json()["error"]
    r = client.post("/items", json={"items": [{"id": "m", "vector": [0.1] * 128,
                                               "meta": {"x": {"nested": 1}}}],
                                    "encoder_sha256": index.encoder_sha256}, headers=w)
    assert r.status_code == 200     # nested plain JSON metadata is fine
    big = b'{"vectors": [' + b"0.0," * 400_000 + b'0.0], "encoder_sha256": "x"}'
    r = client.post("/search", content=big, headers={**h(keys["reader"]),
                                                    "content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]


# ---------------------------------------------------------------------- crash

SERVER = "import sys; from nearfar.cli import main; sys.exit(main(sys.argv[1:]))"


def test_sigkill_mid_batch_loses_no_acknowledged_item(run_dir, manifest, keys, images,
                                                      tmp_path):
    folder = tmp_path / "index"
    build_index(run_dir, folder, data=str(manifest), actor="test").close()
    url_file = tmp_path / "url"
    proc = subprocess.Popen([sys.executable, "-c", SERVER, "serve", str(folder), "--run",
                             str(run_dir), "--keys", str(keys["path"]), "--port", "0",
                             "--url-file", str(url_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not url_file.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        url = url_file.read_text().strip()
        acked: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def adder(worker: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as client:
                for i in range(10_000):
                    if stop.is_set():
                        return
                    item_id = f"w{worker}-{i}"
                    try:
                        r = client.post("/items", headers=h(keys["writer"]), json={
                            "items": [{"id": item_id, "image": images[i % 80].tolist(),
                                       "meta": {"worker": worker}}]})
                    except httpx.HTTPError:
                        return                      # the server died mid-request
                    if r.status_code == 200:
                        with lock:
                            acked.append(item_id)

        threads = [threading.Thread(target=adder, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        while len(acked) < 30 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)           # mid-batch: requests are in flight
        proc.wait()
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(acked) >= 30
    index = VectorIndex.open(folder)
    lost = [i for i in acked if i not in index]
    assert not lost, f"acknowledged items lost: {lost[:5]}"
    assert index.verify(deep=True)["ok"]
    index.close()
    assert main(["index", "verify-log", str(folder)]) == 0


# ---------------------------------------------------------------------- helpers

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
