"""Where checkpoints come from: resolve a spec to a local file, download and verify it into the cache, hash it
for the run manifest.

A spec is one of:
    /a/local/path.pth              used in place
    https://host/file.pth          downloaded once into <cache>/url/<sha1(url)[:12]>/<file name>
    s3://bucket/path/file.pth      any other fsspec URL (gs://, az://, ... once their fsspec package is installed):
                                   copied once into the same place; credentials and endpoints come from the
                                   environment (AWS_ENDPOINT_URL, AWS_PROFILE, ..., $SUBJECTDIFF_STORAGE_OPTIONS)
                                   through catalogs.storage.filesystem, as for the rest of the project
    file:///a/path.pth             copied the same way (lets tests exercise the URL path offline)
    hf://owner/repo/path/file.pth  huggingface_hub.hf_hub_download into <cache>/hf
    pkg://package/path/in/package  a file shipped inside an installed package (GroundingDINO's configs)
    owner/name                     a Hugging Face hub id: the captioner's, left to `from_pretrained` with
                                   cache_dir=<cache>/hf; a model folder's (`resolve_folder`: the diffusers base of
                                   train and infer), its snapshot in <cache>/hf
GroundingDINO's text encoder is a BERT folder or a hub id ("bert-base-uncased"); `resolve_text_encoder`
turns the id into its snapshot folder in <cache>/hf, since groundingdino-py's own `from_pretrained(id)`
would download into the default Hugging Face cache instead.

Expected digests. Any file spec may end in `#sha256=<64 hex digits>` or `#md5=<32 hex digits>`:
    https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth#sha256=a7bf3b02...
    s3://models/sam_vit_h.pth#sha256=a7bf3b02...        /shared/sam.pth#md5=<32 hex digits>
The fragment is never sent to a server and is not part of the cache key. A URL listed in PUBLISHED_HASHES
(the default checkpoints) is also checked against its publisher's digest, with or without a fragment. A
local path that fails its digest is an error (it is not deleted); a download that fails it is deleted.

Downloads (http(s) and fsspec URLs) go to `<name>.<tag>.part` in the target's cache folder, are checked
(size, then digests) and only then renamed to `<name>`: a file under the final name is always complete
and verified. An interrupted transfer keeps its .part, and the next call resumes it (an HTTP Range request,
a seek on a bucket) as long as the remote file's size and ETag are unchanged (they make the `<tag>`). A
wrong digest deletes the .part. `<name>.digests.json` next to the file records its digests, size and mtime,
so cache hits and the run manifest need not re-read a 2.4 GB file. A `<name>.lock` file lets one process
per cache download a target while others (Ray actors on the same node) wait. Progress goes to stderr.

The cache folder is $SUBJECTDIFF_CACHE, else ~/.cache/subjectdiff.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import re
import sys
import urllib.parse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from subjectdiff.catalogs import storage
from subjectdiff.catalogs.storage import cache_root  # one cache folder for the project

DIGEST_LENGTHS = {"sha256": 64, "md5": 32}  # hex digits of each digest a spec may name
CHUNK = 8 << 20  # bytes per read when copying from a bucket and when hashing

# Published digests of the default (and alternative) checkpoints, keyed by URL: (algorithm, hex digest).
# Only digests found in public sources are listed; each cites where. A URL may be registered here by users
# of the library too (`PUBLISHED_HASHES[url] = ("sha256", hexdigest)`).
PUBLISHED_HASHES: dict[str, tuple[str, str]] = {
    # SAM's three checkpoints (the 6 hex digits in their names are not SHA-256 prefixes; reportedly MD5 ones).
    # SHA-256 from the pooch registry that micro-sam verifies these exact URLs with:
    # github.com/computational-cell-analytics/micro-sam, micro_sam/util.py (commit 00006fc6a86d, `MODELS`);
    # the ViT-H one also in github.com/mlfpm/deepof, docker/download_models.py.
    "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth": (
        "sha256",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
    "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth": (
        "sha256",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth": (
        "sha256",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    # GroundingDINO SwinT-OGC, the v0.1.0-alpha release asset: github.com/ghostcipher1/GroundedDINO-VL,
    # groundeddino_vl/weights_manager.py (`KNOWN_CHECKSUMS`, for the same file's Hugging Face copy
    # ShilongLiu/GroundingDINO); public Dockerfiles and set-up scripts check the GitHub release download
    # against the same digest with `sha256sum -c`.
    "https://github.com/IDEA-Research/GroundingDINO/releases/download/v0.1.0-alpha/groundingdino_swint_ogc.pth": (
        "sha256",
        "3b3ca2563c77c69f651d7bd133e97139c186df06231157a64c507099c52bc799",
    ),
}

_DIGEST_FRAGMENT = re.compile(r"#(sha256|md5)=([^#]*)$")


class WeightsError(FileNotFoundError):
    """A checkpoint spec cannot be resolved; the message says what was tried and what to do."""


def cache_dir() -> Path:
    """$SUBJECTDIFF_CACHE or ~/.cache/subjectdiff (created on demand)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


def is_hub_id(spec: str) -> bool:
    """'Salesforce/blip-image-captioning-large'-like: one slash, no scheme, not an existing path."""
    return (
        "://" not in spec and spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists()
    )


def split_digest(spec: str) -> tuple[str, tuple[str, str] | None]:
    """`spec` without its `#sha256=<hex>` / `#md5=<hex>` fragment, and (algorithm, lowercase hex) or None."""
    m = _DIGEST_FRAGMENT.search(spec)
    if m is None:
        return spec, None
    algo, digest = m.group(1), m.group(2).lower()
    if len(digest) != DIGEST_LENGTHS[algo] or not re.fullmatch(r"[0-9a-f]+", digest):
        raise WeightsError(f"{spec!r}: #{algo}= takes {DIGEST_LENGTHS[algo]} hex digits, got {m.group(2)!r}")
    return spec[: m.start()], (algo, digest)


def expected_digests(spec: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(spec without its fragment, [(algorithm, hex digest, where it comes from)]): the spec's own digest and the
    published one of its URL (PUBLISHED_HASHES), each to be checked."""
    base, own = split_digest(spec)
    expected = [(*own, "given in the spec")] if own else []
    published = PUBLISHED_HASHES.get(base)
    if published and published != own:
        expected.append((*published, "published"))
    return base, expected


def resolve(spec: str, *, download: bool = True) -> Path:
    """A local file (or folder) for `spec`; downloads URLs and hub files into the cache when needed, and checks
    the expected digests (module docstring). WeightsError, with a one-line reason, when that fails."""
    base, expected = expected_digests(spec)
    if base.startswith("pkg://"):
        path = _package_file(base[len("pkg://") :])
    elif base.startswith("hf://"):
        path = _hf_file(base[len("hf://") :], download)
    elif "://" in base:
        return _remote_file(base, expected, download)
    else:
        path = Path(base).expanduser()
        if not path.exists():
            raise WeightsError(f"checkpoint {spec!r} is not a local path, URL, hf:// or pkg:// spec that exists")
    if expected:
        problem = _mismatch(str(path), _local_digests(path, expected), expected)
        if problem:
            raise WeightsError(problem)
    return path


# A text encoder's config, tokenizer and safetensors weights; hub repos also hold TF, Flax and ONNX copies.
TEXT_ENCODER_FILES = ("*.json", "*.txt", "*.safetensors")


def hub_snapshot(repo: str, *, download: bool, allow_patterns: tuple[str, ...] | None = None) -> Path:
    """The hub repo's snapshot folder in <cache>/hf (its name is the commit). The cache is tried first, so a
    cached repo needs no network; with `download` a missing one is fetched. WeightsError when neither works."""
    from huggingface_hub import snapshot_download

    kw = dict(cache_dir=cache_dir() / "hf", allow_patterns=list(allow_patterns) if allow_patterns else None)
    try:
        return Path(snapshot_download(repo, local_files_only=True, **kw))
    except Exception as e:  # not cached: the hub's error types vary by version
        error = e
    if download:
        try:
            return Path(snapshot_download(repo, **kw))
        except Exception as e:
            error = e
    raise WeightsError(
        f"{repo!r} is not in the cache ({cache_dir() / 'hf'}) ({type(error).__name__}: {error})"
    ) from error


# A diffusers pipeline's configs, tokenizer and safetensors weights (not the .bin, fp16, ONNX and Flax copies hub repos
# also hold): what UNet2DConditionModel, AutoencoderKL, CLIPTextModel and DDPMScheduler.from_pretrained read.
DIFFUSERS_FILES = ("*.json", "*.txt", "*/diffusion_pytorch_model.safetensors", "*/model.safetensors")


def resolve_folder(spec: str, *, download: bool = True, allow_patterns: tuple[str, ...] | None = None) -> Path:
    """A local folder for a model folder spec (a diffusers folder, say): a local folder, checked in place against
    an optional #sha256= (over its files, as the run manifest hashes folders); or a hub id's snapshot in <cache>/hf
    (`hub_snapshot`: the cache first, then the hub with `download`; only the files matching ALLOW_PATTERNS), never
    the default Hugging Face cache. WeightsError when that fails."""
    base, expected = expected_digests(spec)
    if not is_hub_id(base):
        return resolve(spec, download=download)
    path = hub_snapshot(base, download=download, allow_patterns=allow_patterns)
    if expected:
        problem = _mismatch(f"{base} ({path})", _local_digests(path, expected), expected)
        if problem:
            raise WeightsError(problem)
    return path


def resolve_text_encoder(spec: str, *, download: bool = True) -> Path:
    """A local folder for GroundingDINO's text encoder: `spec` itself when it is a folder, else the hub id's
    snapshot in <cache>/hf (`hub_snapshot`; `subjectdiff datagen weights` fetches it ahead of a run)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    try:
        return hub_snapshot(spec, download=download, allow_patterns=TEXT_ENCODER_FILES)
    except WeightsError as e:
        raise WeightsError(
            f"text encoder: {e}. It is not a local folder either: run `subjectdiff datagen weights` where the "
            "Hugging Face hub is reachable, or set ground.text_encoder to a local BERT folder"
        ) from e


def _package_file(rest: str) -> Path:
    package, _, inner = rest.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise WeightsError(f"pkg://{rest}: package {package!r} is not installed")
    path = Path(list(found.submodule_search_locations)[0]) / inner
    if not path.exists():
        raise WeightsError(f"pkg://{rest}: {path} does not exist in the installed {package!r}")
    return path


def _hf_file(rest: str, download: bool) -> Path:
    parts = rest.split("/")
    if len(parts) < 3:
        raise WeightsError(f"hf://{rest}: expected hf://owner/repo/path/to/file")
    from huggingface_hub import hf_hub_download

    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo, filename, cache_dir=cache_dir() / "hf", local_files_only=not download))
    except Exception as e:  # the hub's own errors vary by version; say what to do
        raise WeightsError(f"hf://{rest}: could not fetch ({_one_line(e)}); download it and pass the local path") from e


# ----------------------------------------------------------------------------------- downloads into the cache


def cache_path(url: str) -> Path:
    """Where `url` (without a digest fragment) is cached: <cache>/url/<sha1(url)[:12]>/<the URL's file name>."""
    name = urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1] or "checkpoint"
    return cache_dir() / "url" / hashlib.sha1(url.encode()).hexdigest()[:12] / name


def _remote_file(url: str, expected: list[tuple[str, str, str]], download: bool) -> Path:
    target = cache_path(url)
    if target.exists() and _usable(target, url, expected, download):
        return target
    if not download:
        raise WeightsError(f"{url} is not in the cache ({target}) and downloads are off")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target, url):
        if target.exists() and _usable(target, url, expected, download):  # another process just finished it
            return target
        return _download(url, target, expected)


def _usable(target: Path, url: str, expected: list[tuple[str, str, str]], download: bool) -> bool:
    """True when the cached `target` matches `expected`. One that was changed on disk after its download is
    deleted (with `download`) so that it is fetched again; one that is still the file as downloaded is kept
    and the mismatch is an error, rather than a silent 2.4 GB download for a mistyped digest."""
    problem, intact = _cached_mismatch(target, expected)
    if problem is None:
        return True
    if intact:
        raise WeightsError(
            f"{problem}; that is the file {url} served when it was cached: correct the digest, or "
            f"delete {target} if the file at that URL has changed"
        )
    if not download:
        raise WeightsError(f"{problem}; it changed on disk after its download")
    print(f"subjectdiff: {problem}; it changed on disk after its download, downloading it again", file=sys.stderr)
    target.unlink(missing_ok=True)
    _sidecar(target).unlink(missing_ok=True)
    return False


def _download(url: str, target: Path, expected: list[tuple[str, str, str]]) -> Path:
    http = url.startswith(("http://", "https://"))
    size, version = _http_stat(url) if http else _fsspec_stat(url)
    part = _part_file(target, size, version)
    try:
        (_http_fetch if http else _fsspec_fetch)(url, part, size, target.name)
        got = part.stat().st_size
        if size is not None and got != size:
            raise OSError("the source ended early")
    except Exception as e:
        got = part.stat().st_size if part.exists() else 0
        of = f"{size}" if size is not None else "an unknown number of"
        raise WeightsError(
            f"download of {url} stopped at {got} of {of} bytes ({_reason(e)}); they are kept in "
            f"{part}: run the same command again to resume"
        ) from e
    digests = _file_digests(part, {algo for algo, _, _ in expected} | {"sha256"})
    problem = _mismatch(url, digests, expected)
    if problem:
        part.unlink()
        raise WeightsError(f"{problem}; the download was deleted and nothing was cached")
    _write_sidecar(target, part, digests)
    os.replace(part, target)  # same folder, so atomic: the final name only ever holds a verified file
    return target


def _part_file(target: Path, size: int | None, version: str) -> Path:
    """The temporary file for this version of the remote file. A part of another version (the remote file
    changed) cannot be resumed and is removed; without a size and version nothing can be resumed safely."""
    tag = hashlib.sha1(f"{size}|{version}".encode()).hexdigest()[:10] if size is not None and version else None
    part = target.with_name(f"{target.name}.{tag}.part" if tag else f"{target.name}.part")
    for stale in target.parent.glob(glob.escape(target.name) + ".*part"):
        if stale != part or tag is None:
            stale.unlink(missing_ok=True)
    return part


def _http_session():
    """A plain requests session, not huggingface_hub's: under HF_HUB_OFFLINE (the Hub's off switch, which
    offline clusters and this project's tests set so that no library calls the Hub) those refuse every URL,
    and a checkpoint's URL is not the Hub. Proxies and NO_PROXY come from the environment, as in requests."""
    import requests

    return requests.Session()


def _http_stat(url: str) -> tuple[int | None, str]:
    """(size, ETag or Last-Modified) from a HEAD request; (None, "") where the server does not say."""
    try:
        with _http_session() as s:
            r = s.head(url, allow_redirects=True, timeout=30)
    except Exception as e:
        raise WeightsError(f"could not reach {url} ({_one_line(e)})") from e
    if r.status_code in (404, 410):
        raise WeightsError(f"{url}: HTTP {r.status_code} {r.reason}, there is no such file")
    if not r.ok or r.headers.get("Content-Encoding"):  # e.g. GET-only signed URLs; a compressed length is no size
        return None, ""
    length = r.headers.get("Content-Length", "")
    return (int(length) if length.isdigit() else None), r.headers.get("ETag") or r.headers.get("Last-Modified") or ""


def _http_fetch(url: str, part: Path, size: int | None, name: str) -> None:
    # One streamed GET from where the .part ends (a Range header); a server that ignores the range answers
    # 200 with the whole file, which then starts over. A dropped connection raises, leaving the .part for the
    # next call to resume. (torch.hub.download_url_to_file checks a hash prefix but always starts from byte 0:
    # for SAM ViT-H, 2.4 GB again after any interruption.)
    resume = _resume_offset(part, size)
    if size is not None and resume == size:
        return
    headers = {"Range": f"bytes={resume}-"} if resume else {}
    with _http_session() as s, s.get(url, headers=headers, stream=True, allow_redirects=True, timeout=60) as r:
        r.raise_for_status()
        if r.status_code != 206:
            resume = 0
        with open(part, "ab" if resume else "wb") as out, _progress(name, size, resume) as bar:
            for chunk in r.iter_content(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))


def _fsspec_stat(url: str) -> tuple[int | None, str]:
    fs, path = _fsspec(url)
    try:
        fs.invalidate_cache(path)
        info = fs.info(path)
    except FileNotFoundError as e:
        raise WeightsError(f"{url}: there is no such file") from e
    except Exception as e:  # credentials, endpoint, permissions: the filesystem's own words
        raise WeightsError(f"could not read {url} ({type(e).__name__}: {_one_line(e)})") from e
    keys = ("ETag", "etag", "md5Hash", "LastModified", "last_modified", "updated", "mtime")
    version = next((str(info[k]) for k in keys if info.get(k)), "")
    return info.get("size"), version


def _fsspec_fetch(url: str, part: Path, size: int | None, name: str) -> None:
    # Buckets go through fsspec (s3fs, gcsfs, adlfs): the filesystem the rest of the project reads them with,
    # configured by the same environment. A resumed copy seeks past what the .part already holds.
    fs, path = _fsspec(url)
    resume = _resume_offset(part, size)
    with fs.open(path, "rb") as src, open(part, "ab") as out, _progress(name, size, resume) as bar:
        if resume:
            src.seek(resume)
        for chunk in iter(lambda: src.read(CHUNK), b""):
            out.write(chunk)
            bar.update(len(chunk))


def _fsspec(url: str):
    try:
        return storage.filesystem(url)  # the project's storage options ($SUBJECTDIFF_STORAGE_OPTIONS) included
    except storage.StorageError as e:  # an unknown protocol, its package not installed, unusable options
        raise WeightsError(f"{url}: no filesystem for this URL ({_one_line(e)})") from e


def _resume_offset(part: Path, size: int | None) -> int:
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # not a prefix of this file
        part.unlink()
        return 0
    return have


def _progress(desc: str, total: int | None, initial: int):
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    # Off a terminal (Ray set-up logs, CI) every refresh is a line of log: refresh every 10 s there.
    return tqdm(
        desc=desc,
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        mininterval=0.5 if tty else 10.0,
        dynamic_ncols=tty,
    )


@contextlib.contextmanager
def _exclusive(target: Path, url: str):
    """One process at a time downloads `target` (the others wait, then find it in the cache)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"subjectdiff: waiting for another process downloading {url} ({lock.lock_file})", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------------- digests


def _mismatch(where: str, digests: dict[str, str], expected: list[tuple[str, str, str]]) -> str | None:
    """The first expected digest that `digests` do not match, as an error line; None when all match."""
    for algo, want, origin in expected:
        if digests[algo] != want:
            return f"{where}: {algo} mismatch: expected {want} ({origin}), got {digests[algo]}"
    return None


def _cached_mismatch(target: Path, expected: list[tuple[str, str, str]]) -> tuple[str | None, bool]:
    """(the first mismatch as an error line or None, whether `target` is still the file as downloaded)."""
    if not expected:
        return None, True
    algos = {algo for algo, _, _ in expected} | {"sha256"}
    recorded = _recorded_digests(target)  # empty once the file's size or mtime changed
    digests = recorded if algos <= recorded.keys() else _file_digests(target, algos)
    intact = recorded.get("sha256") == digests["sha256"]
    problem = _mismatch(f"cached {target}", digests, expected)
    if problem is None and digests is not recorded:
        _write_sidecar(target, target, digests)  # never for a file that fails: it would pass as intact later
    return problem, intact


def _local_digests(path: Path, expected: list[tuple[str, str, str]]) -> dict[str, str]:
    algos = {algo for algo, _, _ in expected}
    if algos == {"sha256"}:
        return {"sha256": file_sha256(path)}  # folders too, as the manifest hashes them
    if path.is_dir():
        raise WeightsError(f"{path} is a folder: only #sha256= (over its files, as the run manifest) applies")
    return _file_digests(path, algos)


def _file_digests(path: Path, algos: set[str]) -> dict[str, str]:
    # One read for all algorithms; MD5 is only ever an integrity check here (FIPS builds allow it so).
    hashes = {a: hashlib.new(a, usedforsecurity=False) if a == "md5" else hashlib.new(a) for a in sorted(algos)}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            for h in hashes.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashes.items()}


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".digests.json")


def _write_sidecar(target: Path, data: Path, digests: dict[str, str]) -> None:
    """Record `digests` of the file `data` (soon renamed to `target`, which keeps its size and mtime)."""
    st = data.stat()
    tmp = _sidecar(target).with_suffix(".tmp")
    tmp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, **digests}))
    os.replace(tmp, _sidecar(target))


def _recorded_digests(path: Path) -> dict[str, str]:
    """Digests recorded next to a cached file, if it is still the file they were recorded for."""
    try:
        record = json.loads(_sidecar(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return {}
    if record.get("size") != st.st_size or record.get("mtime_ns") != st.st_mtime_ns:
        return {}
    return {a: record[a] for a in DIGEST_LENGTHS if isinstance(record.get(a), str)}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _reason(e: BaseException) -> str:
    """The innermost message of a wrapped network error (requests wraps urllib3 wraps http.client)."""
    while e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]
    return _one_line(e) if not (e.args and isinstance(e.args[0], str)) else " ".join(e.args[0].split())[:300]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a folder's files (sorted by relative path) for save_pretrained folders.
    A downloaded checkpoint's digest recorded at download time (`<name>.digests.json`) is used while the file
    keeps its size and mtime, so the manifest does not re-read 2.4 GB per run."""
    path = Path(path)
    recorded = _recorded_digests(path).get("sha256") if path.is_file() else None
    if recorded:
        return recorded
    st = path.stat()
    return _sha256_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def manifest_entry(spec: str) -> dict[str, str]:
    """{"spec", "path", "sha256"} for a run manifest; hub ids with the cached snapshot's commit instead."""
    if is_hub_id(spec):  # the snapshot in the cache names its commit: that is the hub's exact version
        try:
            path = hub_snapshot(spec, download=False)
            return {"spec": spec, "path": str(path), "sha256": "", "revision": path.name}
        except WeightsError:  # not in the cache (yet): recorded by name
            return {"spec": spec, "path": "", "sha256": "", "revision": ""}
    path = resolve(spec, download=False)
    return {"spec": spec, "path": str(path), "sha256": file_sha256(path)}


def text_encoder_entry(spec: str) -> dict[str, str]:
    """manifest_entry for a text encoder: a folder with its SHA-256, a hub id with its cached snapshot's commit."""
    try:
        path = resolve_text_encoder(spec, download=False)
    except WeightsError:  # not in the cache (yet): recorded by name
        return {"spec": spec, "path": "", "sha256": "", "revision": ""}
    if Path(spec).expanduser().is_dir():
        return {"spec": spec, "path": str(path), "sha256": file_sha256(path)}
    return {"spec": spec, "path": str(path), "sha256": "", "revision": path.name}


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint a stage's settings need (what each datagen stage's `checkpoints(cfg, download)` lists):
    NAME as the run manifest keys it ("segment.checkpoint"), its SPEC, and whether it is GroundingDINO's text
    encoder (a BERT folder or a hub id, resolved to a snapshot folder: `resolve_text_encoder`)."""

    name: str
    spec: str
    text_encoder: bool = False

    def fetch(self) -> Path:
        """The local file or folder, downloaded (and verified) into the cache when missing."""
        if self.text_encoder:
            return resolve_text_encoder(self.spec, download=True)
        if is_hub_id(self.spec):
            return hub_snapshot(self.spec, download=True)
        return resolve(self.spec, download=True)

    def entry(self) -> dict[str, str]:
        """Its run-manifest entry ({"spec", "path", "sha256"}); never downloads: a spec not resolved here yet
        (a URL never fetched) is recorded with an empty path and hash."""
        if self.text_encoder:
            return text_encoder_entry(self.spec)
        try:
            return manifest_entry(self.spec)
        except WeightsError:
            return {"spec": self.spec, "path": "", "sha256": ""}
