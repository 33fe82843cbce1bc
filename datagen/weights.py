"""Where checkpoints come from: resolve a spec to a local file, cache downloads, hash for the run manifest.

A spec is one of:
    /a/local/path.pth              used in place
    https://host/file.pth          downloaded once into <cache>/url/<sha1(url)[:12]>/<file name>
    file:///a/path.pth             same, copied (lets tests exercise the URL path offline)
    hf://owner/repo/path/file.pth  huggingface_hub.hf_hub_download into <cache>/hf
    pkg://package/path/in/package  a file shipped inside an installed package (GroundingDINO's configs)
    owner/name                     (captioner only) a Hugging Face hub id, left to `from_pretrained`
                                   with cache_dir=<cache>/hf
GroundingDINO's text encoder is a BERT folder or a hub id ("bert-base-uncased"); `resolve_text_encoder`
turns the id into its snapshot folder in <cache>/hf, since groundingdino-py's own `from_pretrained(id)`
would download into the default Hugging Face cache instead.

The cache folder is $SUBJECTDIFF_CACHE, else ~/.cache/subjectdiff.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import urllib.request
from functools import lru_cache
from pathlib import Path

ENV_CACHE = "SUBJECTDIFF_CACHE"


class WeightsError(FileNotFoundError):
    """A checkpoint spec cannot be resolved; the message says what was tried and what to do."""


def cache_dir() -> Path:
    """$SUBJECTDIFF_CACHE or ~/.cache/subjectdiff (created on demand)."""
    root = Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "subjectdiff").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def is_hub_id(spec: str) -> bool:
    """'Salesforce/blip-image-captioning-large'-like: one slash, no scheme, not an existing path."""
    return "://" not in spec and spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists()


def resolve(spec: str, *, download: bool = True) -> Path:
    """A local file (or folder) for `spec`; downloads URLs and hub files into the cache when needed."""
    if spec.startswith("pkg://"):
        return _package_file(spec[len("pkg://"):])
    if spec.startswith("hf://"):
        return _hf_file(spec[len("hf://"):], download)
    if spec.startswith(("http://", "https://", "file://")):
        return _url_file(spec, download)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    raise WeightsError(f"checkpoint {spec!r} is not a local path, URL, hf:// or pkg:// spec that exists")


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
    raise WeightsError(f"{repo!r} is not in the cache ({cache_dir() / 'hf'}) ({type(error).__name__}: {error})") \
        from error


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
        raise WeightsError(f"hf://{rest}: could not fetch ({e}); download it and pass the local path") from e


def _url_file(url: str, download: bool) -> Path:
    name = url.rstrip("/").rsplit("/", 1)[-1] or "checkpoint"
    target = cache_dir() / "url" / hashlib.sha1(url.encode()).hexdigest()[:12] / name
    if target.exists():
        return target
    if not download:
        raise WeightsError(f"{url} is not in the cache ({target}) and downloads are off")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download to a temporary name in the same folder, then rename: a killed download never
    # leaves a truncated file that a later run would take for the checkpoint.
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url) as src:
            shutil.copyfileobj(src, out, length=1 << 20)
        os.replace(tmp, target)
    except Exception as e:
        Path(tmp).unlink(missing_ok=True)
        raise WeightsError(f"could not download {url} to {target} ({e}); fetch it by hand and pass the path") from e
    return target


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a folder's files (sorted by relative path) for save_pretrained folders."""
    path = Path(path)
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


def run_manifest(cfg) -> dict:
    """What a run used: the full config and, per checkpoint spec (GroundingDINO's text encoder included),
    its resolved path and SHA-256.

    cfg: datagen.config.DatagenConfig. Specs not yet resolved locally (e.g. a URL never downloaded)
    are recorded with an empty hash rather than fetched.
    """
    from datagen.stages.ground import text_encoder_spec  # reads GroundingDINO's config file

    specs = {
        "caption.model": cfg.caption.model,
        "ground.config_file": cfg.ground.config_file,
        "ground.checkpoint": cfg.ground.checkpoint,
        "segment.checkpoint": cfg.segment.checkpoint,
    }
    entries = {}
    for name, spec in specs.items():
        try:
            entries[name] = manifest_entry(spec)
        except WeightsError:
            entries[name] = {"spec": spec, "path": "", "sha256": ""}
    try:  # the one the grounder loads: ground.text_encoder, else the config file's text_encoder_type
        text_encoder = text_encoder_spec(cfg.ground, download=False)
    except WeightsError:  # the config file is not here (a URL never fetched): only an explicit one is known
        text_encoder = cfg.ground.text_encoder
    if text_encoder:
        entries["ground.text_encoder"] = text_encoder_entry(text_encoder)
    return {"config": cfg.to_json(), "checkpoints": entries}


def text_encoder_entry(spec: str) -> dict[str, str]:
    """manifest_entry for a text encoder: a folder with its SHA-256, a hub id with its cached snapshot's commit."""
    try:
        path = resolve_text_encoder(spec, download=False)
    except WeightsError:  # not in the cache (yet): recorded by name
        return {"spec": spec, "path": "", "sha256": "", "revision": ""}
    if Path(spec).expanduser().is_dir():
        return {"spec": spec, "path": str(path), "sha256": file_sha256(path)}
    return {"spec": spec, "path": str(path), "sha256": "", "revision": path.name}
