"""Assets: the download code against a real HTTP server on 127.0.0.1, the cache, the ledger, offline use.

The official hosts cannot be reached here, so each test registers assets whose URLs point at a
threaded ``http.server`` serving bytes the test made. The server can cut a response short, ignore
Range requests, or change a file between downloads, which is what the resume and checksum logic
has to survive.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from bench import assets
from bench.errors import UserError

TIMEOUT = 5.0


class _Server:
    """What the handler serves and what it saw: files by URL path, per-path faults, request log."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut_once: set[str] = set()  # send half the bytes, then close, on the next request only
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.base = ""


class _Handler(BaseHTTPRequestHandler):
    timeout = TIMEOUT  # socket timeout on the server side too: no test can hang on a stuck peer
    state: _Server

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        st = self.state
        rng = self.headers.get("Range")
        st.requests.append((self.path, rng))
        data = st.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and not st.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in st.cut_once:
            st.cut_once.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    state = _Server()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(TIMEOUT)


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("DIT_BENCH_OFFLINE", raising=False)


def _payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _serve_file(server, monkeypatch, name="toy-ckpt", filename="toy.pt", data=None, sha256=None):
    """Serve ``data`` at /<filename> and register a one-file asset for it."""
    data = _payload(2_500_000) if data is None else data  # > 2 read chunks of 1 MiB
    server.files[f"/{filename}"] = data
    asset = assets.Asset(name, (assets.RemoteFile(filename, f"{server.base}/{filename}", sha256=sha256),),
                         "test asset")
    monkeypatch.setitem(assets.REGISTRY, name, asset)
    return asset, data


def _gets(server, path):
    return [r for r in server.requests if r[0] == path]


# -------------------------------------------------------------------------------------------------
# The real registry: the official addresses (dit.md A.4, B.6, E.1, E.2).


def test_registry_holds_the_official_addresses():
    src = {name: a.source for name, a in assets.REGISTRY.items()}
    assert src["DiT-XL-2-256"] == "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"
    assert src["DiT-XL-2-512"] == "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt"
    ref = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
    assert src["adm-ref-imagenet256"] == ref + "imagenet/256/VIRTUAL_imagenet256_labeled.npz"
    assert src["adm-ref-imagenet512"] == ref + "imagenet/512/VIRTUAL_imagenet512.npz"
    assert src["adm-inception-graph"] == ref + "classify_image_graph_def.pb"
    assert src["pt-inception-fid"].endswith("/fid_weights/pt_inception-2015-12-05-6726825d.pth")
    for vae in ("sd-vae-ft-ema", "sd-vae-ft-mse"):
        a = assets.REGISTRY[vae]
        assert a.kind == "folder"
        assert [f.url for f in a.files] == [
            f"https://huggingface.co/stabilityai/{vae}/resolve/main/config.json",
            f"https://huggingface.co/stabilityai/{vae}/resolve/main/diffusion_pytorch_model.safetensors"]
    # No invented hashes: none of these hosts publishes a sha256, so all are recorded on first download.
    assert all(f.sha256 is None for a in assets.REGISTRY.values() for f in a.files)
    # An official filename finds its asset too (what DiT's own --ckpt flag accepts).
    assert assets.get("DiT-XL-2-256x256.pt").name == "DiT-XL-2-256"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIT_BENCH_CACHE", str(tmp_path / "elsewhere"))
    assert assets.cache_dir() == tmp_path / "elsewhere"
    assert assets.REGISTRY["DiT-XL-2-512"].path() == tmp_path / "elsewhere" / "DiT-XL-2-512x512.pt"
    monkeypatch.delenv("DIT_BENCH_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "dit-bench"


# -------------------------------------------------------------------------------------------------
# Downloads.


def test_fetch_installs_the_file_and_records_its_sha256(server, online, monkeypatch):
    asset, data = _serve_file(server, monkeypatch)
    path = assets.fetch(asset.name, progress=True, timeout=TIMEOUT)  # with the rich bar: it must not break
    assert path == assets.cache_dir() / "toy.pt"
    assert path.read_bytes() == data
    assert not path.with_name("toy.pt.part").exists()
    ledger = json.loads((assets.cache_dir() / "sha256.json").read_text())
    assert ledger == {"toy.pt": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                 "url": f"{server.base}/toy.pt"}}
    # Fetched once, never again: neither fetch nor resolve goes back to the server.
    assert assets.fetch(asset.name, progress=False) == path
    assert assets.resolve(asset.name) == path
    assert len(_gets(server, "/toy.pt")) == 1
    assert [c.status for c in assets.verify(asset.name)] == ["ok"]


def test_resolve_downloads_a_missing_asset_when_online(server, online, monkeypatch):
    asset, data = _serve_file(server, monkeypatch)
    assert assets.resolve(asset.name, progress=False).read_bytes() == data


def test_resume_after_a_cut_connection_uses_a_range_request(server, online, monkeypatch):
    asset, data = _serve_file(server, monkeypatch)
    server.cut_once.add("/toy.pt")
    half = len(data) // 2
    with pytest.raises(assets.DownloadError, match=rf"stopped after {half} of {len(data)} bytes"):
        assets.fetch(asset.name, progress=False, timeout=TIMEOUT)
    part = assets.cache_dir() / "toy.pt.part"
    assert part.read_bytes() == data[:half]  # the partial bytes are kept, and they are the right ones
    assert not asset.path().exists()  # nothing half-done is installed

    path = assets.fetch(asset.name, progress=False, timeout=TIMEOUT)
    assert _gets(server, "/toy.pt") == [("/toy.pt", None), ("/toy.pt", f"bytes={half}-")]
    assert path.read_bytes() == data
    assert not part.exists()
    # The recorded hash covers the whole file, not only the resumed tail.
    assert json.loads((assets.cache_dir() / "sha256.json").read_text())["toy.pt"]["sha256"] == \
        hashlib.sha256(data).hexdigest()


def test_a_server_that_ignores_range_restarts_the_download(server, online, monkeypatch):
    asset, data = _serve_file(server, monkeypatch)
    server.cut_once.add("/toy.pt")
    server.ignore_range = True
    with pytest.raises(assets.DownloadError):
        assets.fetch(asset.name, progress=False, timeout=TIMEOUT)
    assert assets.fetch(asset.name, progress=False, timeout=TIMEOUT).read_bytes() == data


def test_a_stale_partial_file_longer_than_the_asset_starts_over(server, online, monkeypatch):
    asset, data = _serve_file(server, monkeypatch, data=_payload(1000))
    (assets.cache_dir()).mkdir(parents=True)
    (assets.cache_dir() / "toy.pt.part").write_bytes(b"x" * 5000)  # server answers 416 to bytes=5000-
    assert assets.fetch(asset.name, progress=False, timeout=TIMEOUT).read_bytes() == data
    assert [r[1] for r in _gets(server, "/toy.pt")] == ["bytes=5000-", None]


def test_checksum_mismatch_is_refused_and_nothing_is_installed(server, online, monkeypatch):
    wrong = hashlib.sha256(b"not these bytes").hexdigest()
    asset, data = _serve_file(server, monkeypatch, sha256=wrong)
    with pytest.raises(assets.DownloadError, match="sha256 mismatch") as exc:
        assets.fetch(asset.name, progress=False, timeout=TIMEOUT)
    assert hashlib.sha256(data).hexdigest() in str(exc.value) and wrong in str(exc.value)
    assert not asset.path().exists()
    assert not asset.path().with_name("toy.pt.part").exists()  # bad bytes are not kept for a resume
    assert assets.read_ledger() == {}


def test_a_recorded_hash_guards_later_downloads(server, online, monkeypatch):
    # Trust on first use: after the first download, a changed file upstream is refused.
    asset, data = _serve_file(server, monkeypatch, data=_payload(4000, seed=1))
    path = assets.fetch(asset.name, progress=False, timeout=TIMEOUT)
    server.files["/toy.pt"] = _payload(4000, seed=2)
    with pytest.raises(assets.DownloadError, match="sha256 mismatch"):
        assets.fetch(asset.name, progress=False, force=True, timeout=TIMEOUT)
    assert path.read_bytes() == data  # the good copy stays in place


def test_concurrent_fetches_download_once(server, online, monkeypatch):
    # The ranks of one torchrun all resolve the same checkpoint: only one of them downloads it.
    asset, data = _serve_file(server, monkeypatch)
    results, errors = [], []

    def work():
        try:
            results.append(assets.fetch(asset.name, progress=False, timeout=TIMEOUT))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(4 * TIMEOUT)
    assert errors == [] and len(results) == 3
    assert len(_gets(server, "/toy.pt")) == 1
    assert results[0].read_bytes() == data


def test_folder_asset_fetches_every_file(server, online, monkeypatch):
    cfg, weights = b'{"latent_channels": 4}', _payload(3000)
    server.files.update({"/vae/config.json": cfg, "/vae/diffusion_pytorch_model.safetensors": weights})
    files = tuple(assets.RemoteFile(n, f"{server.base}/vae/{n}")
                  for n in ("config.json", "diffusion_pytorch_model.safetensors"))
    monkeypatch.setitem(assets.REGISTRY, "toy-vae", assets.Asset("toy-vae", files, "test", kind="folder"))
    folder = assets.resolve("toy-vae", progress=False)
    assert folder == assets.cache_dir() / "toy-vae"
    assert (folder / "config.json").read_bytes() == cfg
    assert (folder / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert set(assets.read_ledger()) == {"toy-vae/config.json", "toy-vae/diffusion_pytorch_model.safetensors"}
    assert assets.REGISTRY["toy-vae"].source == f"{server.base}/vae/"


# -------------------------------------------------------------------------------------------------
# Offline: one line naming the file, its source and where to put it.


def _one_line_naming(msg: str, asset: assets.Asset, f: assets.RemoteFile) -> None:
    assert "\n" not in msg
    assert f.filename in msg and f.url in msg and str(asset.file_path(f)) in msg


def test_offline_missing_asset_says_what_where_from_and_where_to(server, monkeypatch):
    asset, _ = _serve_file(server, monkeypatch)  # DIT_BENCH_OFFLINE=1 from conftest
    for call in (lambda: assets.resolve(asset.name), lambda: assets.fetch(asset.name, progress=False)):
        with pytest.raises(assets.AssetMissing) as exc:
            call()
        _one_line_naming(str(exc.value), asset, asset.files[0])
        assert "DIT_BENCH_OFFLINE" in str(exc.value)
    assert isinstance(exc.value, UserError)
    assert server.requests == []  # offline means the network is not touched at all


def test_offline_folder_asset_names_the_missing_file(server, monkeypatch):
    files = tuple(assets.RemoteFile(n, f"{server.base}/vae/{n}") for n in ("config.json", "weights.bin"))
    asset = assets.Asset("toy-vae", files, "test", kind="folder")
    monkeypatch.setitem(assets.REGISTRY, "toy-vae", asset)
    (asset.path()).mkdir(parents=True)
    (asset.path() / "config.json").write_text("{}")
    with pytest.raises(assets.AssetMissing) as exc:
        assets.resolve("toy-vae")
    _one_line_naming(str(exc.value), asset, files[1])


def test_unreachable_server_gives_the_same_manual_instructions(online, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f = assets.RemoteFile("toy.pt", f"http://127.0.0.1:{port}/toy.pt")
    monkeypatch.setattr(assets, "REGISTRY", dict(assets.REGISTRY))  # register() below is undone after
    asset = assets.register(assets.Asset("toy-down", (f,)))
    assert assets.get("toy-down") is asset
    with pytest.raises(assets.AssetMissing, match="download failed") as exc:
        assets.resolve("toy-down", progress=False)
    _one_line_naming(str(exc.value), asset, f)


def test_http_404_is_reported_with_the_address(server, online, monkeypatch):
    asset, _ = _serve_file(server, monkeypatch)
    del server.files["/toy.pt"]
    with pytest.raises(assets.AssetMissing, match="HTTP 404") as exc:
        assets.fetch(asset.name, progress=False, timeout=TIMEOUT)
    _one_line_naming(str(exc.value), asset, asset.files[0])


def test_resolve_without_download_never_fetches(server, online, monkeypatch):
    asset, _ = _serve_file(server, monkeypatch)
    with pytest.raises(assets.AssetMissing, match="dit-bench assets fetch toy-ckpt"):
        assets.resolve(asset.name, download=False)
    assert server.requests == []


# -------------------------------------------------------------------------------------------------
# A user's own file works wherever a name does; a truncated cached file is caught.


def test_a_user_path_is_returned_as_is(tmp_path):
    mine = tmp_path / "my-DiT.pt"
    mine.write_bytes(b"weights")
    assert assets.resolve(mine) == mine
    assert assets.resolve(str(mine)) == mine
    with pytest.raises(UserError, match="no such file") as exc:
        assets.resolve(tmp_path / "missing.pt")
    assert type(exc.value) is UserError and "\n" not in str(exc.value)


def test_a_local_file_named_like_an_official_file_is_the_users(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("DiT-XL-2-256x256.pt").write_bytes(b"mine")
    assert assets.resolve("DiT-XL-2-256x256.pt") == Path("DiT-XL-2-256x256.pt")
    Path("DiT-XL-2-256x256.pt").unlink()
    with pytest.raises(assets.AssetMissing):  # without the local file, the filename means the asset
        assets.resolve("DiT-XL-2-256x256.pt")


def test_a_truncated_cached_file_is_refused(server, online, monkeypatch):
    asset, data = _serve_file(server, monkeypatch, data=_payload(3000))
    path = assets.fetch(asset.name, progress=False, timeout=TIMEOUT)
    path.write_bytes(data[:1000])
    with pytest.raises(UserError, match="has 1000 bytes but asset 'toy-ckpt' should have 3000"):
        assets.resolve(asset.name)


def test_verify_records_a_hand_placed_file_then_catches_a_change(monkeypatch):
    f = assets.RemoteFile("hand.npz", "https://example.invalid/hand.npz")
    asset = assets.Asset("toy-hand", (f,))
    monkeypatch.setitem(assets.REGISTRY, "toy-hand", asset)
    assert [c.status for c in assets.verify("toy-hand")] == ["missing"]
    asset.path().parent.mkdir(parents=True)
    asset.path().write_bytes(b"placed by hand")
    first = assets.verify("toy-hand")[0]
    assert (first.status, first.detail) == ("recorded", hashlib.sha256(b"placed by hand").hexdigest())
    assert assets.verify("toy-hand")[0].status == "ok"
    asset.path().write_bytes(b"placed by hanD")
    assert assets.verify("toy-hand")[0].status == "mismatch"


# -------------------------------------------------------------------------------------------------
# The CLI.


def test_cli_list_fetch_path_verify(server, online, monkeypatch, cli_runner):
    from cli import app

    asset, data = _serve_file(server, monkeypatch)
    monkeypatch.setenv("COLUMNS", "200")
    res = cli_runner.invoke(app, ["assets", "verify"])  # an empty cache is not a failure
    assert res.exit_code == 0 and "no assets in the cache" in res.output
    res = cli_runner.invoke(app, ["assets", "list"])
    assert res.exit_code == 0, res.output
    rows = {line.split("│")[1].strip(): line for line in res.output.splitlines() if line.count("│") > 3}
    assert {"DiT-XL-2-256", "sd-vae-ft-ema", "adm-ref-imagenet256", "toy-ckpt"} <= set(rows)
    assert "missing" in rows["toy-ckpt"]

    res = cli_runner.invoke(app, ["assets", "path", "toy-ckpt"])
    assert res.exit_code != 0 and isinstance(res.exception, assets.AssetMissing)

    res = cli_runner.invoke(app, ["assets", "fetch", "toy-ckpt", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert asset.path().read_bytes() == data

    res = cli_runner.invoke(app, ["assets", "path", "toy-ckpt"])
    assert res.exit_code == 0 and res.stdout.strip() == str(asset.path())
    res = cli_runner.invoke(app, ["assets", "list"])
    assert "present" in [line for line in res.output.splitlines() if "toy-ckpt" in line][0]

    res = cli_runner.invoke(app, ["assets", "verify"])  # default: every asset in the cache
    assert res.exit_code == 0 and "ok" in res.output
    asset.path().write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    res = cli_runner.invoke(app, ["assets", "verify", "toy-ckpt"])
    assert res.exit_code == 1 and "mismatch" in res.output

    res = cli_runner.invoke(app, ["assets", "verify", "DiT-XL-2-512"])  # named but never fetched
    assert res.exit_code == 1 and "missing" in res.output


def test_cli_path_accepts_a_user_file(tmp_path, cli_runner):
    from cli import app

    mine = tmp_path / "ref.npz"
    mine.write_bytes(b"x")
    res = cli_runner.invoke(app, ["assets", "path", str(mine)])
    assert res.exit_code == 0 and res.stdout.strip() == str(mine)


def test_cli_offline_message_is_one_line_and_exit_code_2(tmp_path):
    # Through the real entry point, so the UserError -> one line -> exit 2 path is what a user sees.
    env = dict(os.environ, DIT_BENCH_OFFLINE="1", DIT_BENCH_CACHE=str(tmp_path / "c"), COLUMNS="80")
    proc = subprocess.run([sys.executable, "-m", "cli", "assets", "path", "DiT-XL-2-256"], env=env,
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt" in lines[0]
    assert str(tmp_path / "c" / "DiT-XL-2-256x256.pt") in lines[0]
