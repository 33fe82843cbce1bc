"""subjectdiff.weights downloads: checkpoints fetched over HTTP from a real server on loopback and from a real S3 API
(moto) into $SUBJECTDIFF_CACHE, resumed after a dropped transfer, checked against expected digests, and
`subjectdiff datagen weights` on top. No network beyond 127.0.0.1."""

from __future__ import annotations

import hashlib
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from subjectdiff import weights
from subjectdiff.cli import main
from subjectdiff.weights import WeightsError, manifest_entry, resolve

MiB = 1 << 20


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileServer:
    """What the fixture's server serves (`files`: URL path -> bytes) and what it was asked (`requests`:
    (method, path, Range header or None)). `cut_after`: the next GET declares the whole length, sends that
    many bytes and closes the connection, as a dropped transfer does."""

    def __init__(self, base: str):
        self.base = base
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.cut_after: int | None = None

    def add(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return self.base + path

    def gets(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET"]


class Handler(BaseHTTPRequestHandler):
    """HEAD and GET with `Range: bytes=N-` (206 + Content-Range) and an ETag, like a CDN serving checkpoints."""

    def do_HEAD(self):
        self.serve(body=False)

    def do_GET(self):
        self.serve(body=True)

    def serve(self, body: bool) -> None:
        state: FileServer = self.server.state
        wanted = self.headers.get("Range")
        state.requests.append((self.command, self.path, wanted))
        data = state.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1)) if wanted else 0
        self.send_response(206 if wanted else 200)
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"')
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not body:
            return
        payload = data[start:]
        if state.cut_after is not None:
            payload, state.cut_after = payload[: state.cut_after], None
            self.close_connection = True
        self.wfile.write(payload)

    def log_message(self, *args):  # keep pytest's output to the test's own
        pass


@pytest.fixture
def server():
    """A threaded http.server on a free loopback port, started here and shut down afterwards."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.state = FileServer(f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBJECTDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # loopback never goes through a proxy someone has set
    return tmp_path / "cache"


def leftovers(folder: Path) -> list[str]:
    """Temporary files a download left next to its target."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


# ------------------------------------------------------------------------------------------------ HTTP


def test_download_once_with_progress_then_cache_hits(server, cache, capfd, monkeypatch):
    import huggingface_hub.constants

    # the Hub's off switch, as offline clusters set it, does not stop a checkpoint URL that is not the Hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    data = blob(300_000)
    url = server.add("/models/sam_small.pth", data)
    path = resolve(url)
    assert path == weights.cache_path(url) and path.is_relative_to(cache / "url")
    assert path.name == "sam_small.pth" and path.read_bytes() == data
    assert leftovers(path.parent) == []
    err = capfd.readouterr().err
    assert "sam_small.pth" in err and "100%" in err  # a progress bar on stderr
    asked = len(server.requests)
    assert resolve(url) == path and resolve(url, download=False) == path
    assert len(server.requests) == asked  # cache hits never reach the server
    assert manifest_entry(url) == {"spec": url, "path": str(path), "sha256": sha256(data)}


def test_dropped_transfer_is_a_clear_error_and_the_next_call_resumes(server, cache):
    # Larger than huggingface_hub's 10 MiB read so that part of it reaches the .part before the cut.
    data = blob(12 * MiB, seed=1)
    url = server.add("/sam_vit_x.pth", data)
    server.cut_after = 11 * MiB
    with pytest.raises(WeightsError) as err:
        resolve(url)
    message = str(err.value)
    m = re.search(r"stopped at (\d+) of (\d+) bytes", message)
    assert m and url in message and "\n" not in message, message
    got, total = map(int, m.groups())
    assert total == len(data) and 0 < got < total
    target = weights.cache_path(url)
    assert not target.exists()
    assert [p.stat().st_size for p in target.parent.glob("*.part")] == [got]

    assert resolve(url).read_bytes() == data
    assert server.gets()[-1] == ("GET", "/sam_vit_x.pth", f"bytes={got}-")  # only the missing bytes again
    assert leftovers(target.parent) == []


def test_a_changed_remote_file_is_not_resumed_onto(server, cache):
    old, new = blob(12 * MiB, seed=2), blob(12 * MiB, seed=3)
    url = server.add("/ckpt.pth", old)
    server.cut_after = 11 * MiB
    with pytest.raises(WeightsError, match="stopped at"):
        resolve(url)
    server.files["/ckpt.pth"] = new  # republished under the same URL: another ETag
    assert resolve(url).read_bytes() == new
    assert server.gets()[-1][2] is None  # downloaded from the start


def test_wrong_digest_fails_and_caches_nothing_then_the_right_one_passes(server, cache):
    data = blob(50_000, seed=4)
    url = server.add("/gdino.pth", data)
    wrong = sha256(b"something else")
    with pytest.raises(WeightsError) as err:
        resolve(f"{url}#sha256={wrong}")
    message = str(err.value)
    assert f"sha256 mismatch: expected {wrong} (given in the spec), got {sha256(data)}" in message
    assert "\n" not in message
    target = weights.cache_path(url)
    assert not target.exists() and leftovers(target.parent) == []

    assert resolve(f"{url}#sha256={sha256(data).upper()}").read_bytes() == data
    assert resolve(f"{url}#md5={hashlib.md5(data).hexdigest()}") == target  # cached; checked by MD5 too
    asked = len(server.requests)
    with pytest.raises(WeightsError, match="md5 mismatch.*correct the digest"):
        resolve(f"{url}#md5={'0' * 32}")
    assert target.read_bytes() == data and len(server.requests) == asked  # kept, and not downloaded again


def test_published_digests_are_checked_without_a_fragment(server, cache, monkeypatch):
    data = blob(40_000, seed=5)
    url = server.add("/segment_anything/sam_vit_q.pth", data)
    monkeypatch.setitem(weights.PUBLISHED_HASHES, url, ("sha256", sha256(b"the published file")))
    with pytest.raises(WeightsError, match=r"sha256 mismatch: expected \w+ \(published\)"):
        resolve(url)
    assert not weights.cache_path(url).exists()

    monkeypatch.setitem(weights.PUBLISHED_HASHES, url, ("sha256", sha256(data)))
    assert resolve(url).read_bytes() == data
    # A cached file that no longer matches (corrupted on disk) is fetched again, not served.
    weights.cache_path(url).write_bytes(b"bit rot")
    assert resolve(url).read_bytes() == data


def test_default_checkpoints_have_published_digests():
    from subjectdiff.datagen import config

    d = config.default()
    for spec in (d.ground.checkpoint, d.segment.checkpoint):
        _, expected = weights.expected_digests(spec)
        assert [(algo, len(digest), origin) for algo, digest, origin in expected] == [("sha256", 64, "published")]


def test_missing_file_and_bad_digest_syntax(server, cache):
    with pytest.raises(WeightsError, match="404"):
        resolve(server.base + "/nothing-here.pth")
    with pytest.raises(WeightsError, match="64 hex digits"):
        resolve(server.add("/x.pth", b"x") + "#sha256=abc123")


def test_local_paths_are_checked_in_place(tmp_path):
    ckpt = tmp_path / "sam.pth"
    ckpt.write_bytes(b"weights")
    assert resolve(f"{ckpt}#sha256={sha256(b'weights')}") == ckpt
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        resolve(f"{ckpt}#sha256={'f' * 64}")
    assert ckpt.read_bytes() == b"weights"  # the user's own file is never deleted


# ---------------------------------------------------------------------------------------------- buckets


def test_bucket_url_is_copied_into_the_cache(bucket, cache, capfd):
    import s3fs

    data = blob(2 * MiB + 5, seed=6)
    s3fs.S3FileSystem().pipe(f"{bucket}/models/sam.pth", data)
    url = f"{bucket}/models/sam.pth"
    path = resolve(f"{url}#sha256={sha256(data)}")
    assert path == weights.cache_path(url) and path.read_bytes() == data
    assert leftovers(path.parent) == []
    assert "sam.pth" in capfd.readouterr().err
    assert manifest_entry(url)["sha256"] == sha256(data)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        resolve(f"{bucket}/models/sam.pth#sha256={'0' * 64}", download=False)
    with pytest.raises(WeightsError, match="no such file"):
        resolve(f"{bucket}/models/missing.pth")


def test_bucket_url_takes_the_endpoint_from_the_storage_options(endpoint_in_options, s3_server, cache):
    """A checkpoint's s3:// URL reaches the bucket whose endpoint only SUBJECTDIFF_STORAGE_OPTIONS names (the
    one fsspec entry point, catalogs.storage.filesystem), and is verified against its digest."""
    import s3fs

    data = blob(MiB + 3, seed=8)
    url = f"{endpoint_in_options}/models/sam.pth"
    s3fs.S3FileSystem(endpoint_url=s3_server).pipe(url, data)
    path = resolve(f"{url}#sha256={sha256(data)}")
    assert path == weights.cache_path(url) and path.read_bytes() == data


def test_bucket_copy_resumes_from_its_part(bucket, cache):
    import s3fs

    data = blob(3 * MiB, seed=7)
    url = f"{bucket}/sam_b.pth"
    spec = f"{url}#sha256={sha256(data)}"
    s3fs.S3FileSystem().pipe(url, data)
    target = weights.cache_path(url)
    target.parent.mkdir(parents=True)
    part = weights._part_file(target, *weights._fsspec_stat(url))  # what an interrupted copy of it leaves
    part.write_bytes(data[:MiB])
    assert resolve(spec).read_bytes() == data and leftovers(target.parent) == []

    # The copy goes on from what the part holds: a part that is not a prefix of the object yields a file
    # that fails its digest, which is deleted, part and all; the next call starts over and completes.
    target.unlink()
    part.write_bytes(b"\0" * MiB)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        resolve(spec)
    assert not target.exists() and leftovers(target.parent) == []
    assert resolve(spec).read_bytes() == data


# ------------------------------------------------------------------------------------------ the command


def local_models(tmp_path: Path) -> list[str]:
    """Overrides that keep `datagen weights --preset default` offline except for the two checkpoints."""
    blip, bert, dinov2 = tmp_path / "blip", tmp_path / "bert", tmp_path / "dinov2"
    for folder in (blip, bert, dinov2):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    gd_config = tmp_path / "gdino_config.py"
    gd_config.write_text('text_encoder_type = "bert-base-uncased"\n')
    clip = tmp_path / "open_clip_model.safetensors"  # the curate stage's weights, in place of the OpenAI tag's
    clip.write_bytes(b"not loaded here")
    return [
        f'caption.model="{blip}"',
        f'ground.config_file="{gd_config}"',
        f'ground.text_encoder="{bert}"',
        f'curate.pretrained="{clip}"',
        f'identity.model="{dinov2}"',
    ]


def test_weights_command_prints_each_checkpoint_and_fails_in_one_line(server, cache, tmp_path, capsys):
    gd = server.add("/groundingdino_t.pth", blob(20_000, seed=8))
    sam = server.add("/sam_t.pth", blob(30_000, seed=9))
    argv = ["datagen", "weights", "--preset", "default", *local_models(tmp_path), f'ground.checkpoint="{gd}"']
    head = server.add("/aesthetic_t.pth", blob(10_000, seed=10))
    assert (
        main([*argv, f'segment.checkpoint="{sam}#sha256={sha256(blob(30_000, seed=9))}"', f'curate.aesthetic="{head}"'])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 and all(" -> " in line for line in lines)
    assert f"{gd} -> {weights.cache_path(gd)}" in lines
    assert f"{head} -> {weights.cache_path(head)}" in lines  # the curate stage's aesthetic head, fetched too

    bad = "1" * 64
    assert main([*argv, f'segment.checkpoint="{sam}#sha256={bad}"']) == 2
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith("subjectdiff datagen: error:")]
    assert len(errors) == 1 and f"expected {bad}" in errors[0]
