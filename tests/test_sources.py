"""subjectdiff.datagen.sources: planning every kind of input (folders, shards, img2dataset, lists, Hugging Face datasets
Parquet; local and fsspec URLs) into a plan where every input is accounted for, and reading units back.
CPU only, no network (HTTP from a server on 127.0.0.1); one end-to-end test (marked slow) starts a local Ray."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from subjectdiff.catalogs import storage
from subjectdiff.datagen import units
from subjectdiff.datagen.sources import PLAN_SCHEMA, SourceError, detect, list_tar, write_plan
from subjectdiff.datagen.units import UnitReadError, read_unit

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "datagen" / "sample_images").glob("*.jpg"))

# How Hugging Face datasets stores an Image feature in Parquet (datasets.Image's pa_type), and the
# schema metadata it writes beside it.
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def jpeg(i: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256)).save(buf, "JPEG")
    return buf.getvalue()


def make_tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def offsets(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return {m.name: m for m in tf.getmembers()}


def plan_rows(src: str, tmp_path: Path, shard_size: int = 10, **kw) -> tuple[dict, list[dict]]:
    plan = tmp_path / f"plan-{uuid.uuid4().hex[:6]}.parquet"
    counts = write_plan(src, plan, shard_size, **kw)
    return counts, pq.read_table(plan).to_pylist()


def read(row: dict) -> bytes:
    return read_unit(row["path"], row["offset"], row["size"], row["column"])


def hf_parquet(where, images: list[dict | None], texts: list[str | None], row_group_size: int | None = None) -> None:
    """A Parquet as `datasets.Dataset.to_parquet` writes one with features {image: Image(), text: Value("string")}:
    WHERE is a local path or an open binary file."""
    features = {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}
    table = pa.table({"image": pa.array(images, HF_IMAGE), "text": pa.array(texts, pa.string())})
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, where, row_group_size=row_group_size)


@pytest.fixture
def http_dir(tmp_path):
    """A folder served over HTTP on 127.0.0.1 by a thread running http.server; yields (folder, base URL)."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def mem():
    """A fresh folder of fsspec's in-memory filesystem, as a URL prefix ending in '/'; removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/t{uuid.uuid4().hex[:10]}"
    yield f"memory://{root.lstrip('/')}/"
    if fs.exists(root):
        fs.rm(root, recursive=True)


def put(url: str, data: bytes) -> None:
    with fsspec.open(url, "wb") as f:
        f.write(data)


class FlakyFS(MemoryFileSystem):
    """memory:// under another protocol, with scripted faults: the first `fail_opens` opens raise
    ConnectionError, the first `short_reads` opens return a file cut to half, and any read past byte
    `read_limit` raises OSError."""

    protocol = "flaky"
    fail_opens = short_reads = opens = 0
    read_limit: int | None = None

    @classmethod
    def _strip_protocol(cls, path):
        return MemoryFileSystem._strip_protocol("memory://" + str(path).removeprefix("flaky://"))

    def _open(self, path, mode="rb", **kwargs):
        if "r" not in mode:
            return super()._open(path, mode, **kwargs)
        cls = type(self)
        cls.opens += 1
        data = super()._open(path, mode, **kwargs).getvalue()
        if cls.opens <= cls.fail_opens:
            raise ConnectionError("connection reset by peer")
        if cls.opens <= cls.fail_opens + cls.short_reads:
            data = data[: len(data) // 2]
        return _LimitedFile(data, cls.read_limit)


class _LimitedFile(io.BytesIO):
    def __init__(self, data: bytes, limit: int | None):
        super().__init__(data)
        self.limit = limit

    def read(self, n=-1):
        if self.limit is not None and (n is None or n < 0 or self.tell() + n > self.limit):
            raise OSError("read timed out")
        return super().read(n)


@pytest.fixture
def flaky(mem, monkeypatch):
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    for attr, value in {"fail_opens": 0, "short_reads": 0, "opens": 0, "read_limit": None}.items():
        monkeypatch.setattr(FlakyFS, attr, value)
    sleeps: list[float] = []
    monkeypatch.setattr(units.time, "sleep", sleeps.append)
    return mem.replace("memory://", "flaky://"), sleeps


# ---- lists ---------------------------------------------------------------------------------------------


def test_lists_are_streamed_from_local_files_and_urls(tmp_path, mem, monkeypatch):
    import pyarrow.csv as pacsv

    def whole(*a, **k):
        raise AssertionError("a list is streamed, never loaded whole")

    def plan_rows(src, tmp_path, **kw):
        with monkeypatch.context() as m:
            for mod, name in ((pq, "read_table"), (pq, "read_pandas"), (pacsv, "read_csv")):
                m.setattr(mod, name, whole)
            counts = write_plan(src, tmp_path / "plan.parquet", kw.get("shard_size", 10))
        return counts, pq.read_table(tmp_path / "plan.parquet").to_pylist()

    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg(i))
        put(f"{mem}lists/imgs/{i}.jpg", jpeg(i))
    csv = "path,caption,other\n" + "".join(f"imgs/{i}.jpg,caption {i},x\n" for i in range(3)) + ",no path,x\n"
    (tmp_path / "list.csv").write_text(csv)
    put(f"{mem}lists/x.csv", csv.encode())
    table = pa.table({"url": [f"imgs/{i}.jpg" for i in range(3)], "text": ["a", None, "c"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "list.parquet", row_group_size=1)
    with fsspec.open(f"{mem}lists/x.parquet", "wb") as f:
        pq.write_table(table, f, row_group_size=1)

    counts, plan = plan_rows(str(tmp_path / "list.csv"), tmp_path, shard_size=2)
    assert counts == {"00000": 2, "00001": 2}
    assert [r["source"] for r in plan[:3]] == [str(tmp_path / "imgs" / f"{i}.jpg") for i in range(3)]
    assert [r["alt_text"] for r in plan] == ["caption 0", "caption 1", "caption 2", "no path"]
    assert plan[3]["error"] == "the list row has no image path (column 'path')"  # accounted for; source names the row
    assert plan[3]["source"].endswith("list.csv#row=3")
    assert read(plan[1]) == jpeg(1)

    _, plan = plan_rows(f"{mem}lists/x.csv", tmp_path)  # a list given as a URL: relative to its folder
    assert [r["source"] for r in plan[:3]] == [f"{mem}lists/imgs/{i}.jpg" for i in range(3)]
    assert read(plan[2]) == jpeg(2)

    for src in (str(tmp_path / "list.parquet"), f"{mem}lists/x.parquet"):
        assert detect(src) == "list"
        _, plan = plan_rows(src, tmp_path)
        assert [r["alt_text"] for r in plan] == ["a", None, "c"] and all(r["error"] is None for r in plan)
        assert [read(r) for r in plan] == [jpeg(i) for i in range(3)]

    (tmp_path / "bad.csv").write_text("name\nx.jpg\n")
    with pytest.raises(SourceError, match="no image column"):
        plan_rows(str(tmp_path / "bad.csv"), tmp_path)
    with pytest.raises(SourceError, match="does not exist"):
        plan_rows(f"{mem}lists/missing.csv", tmp_path)


def test_hugging_face_datasets_parquet_is_read_from_its_image_bytes(tmp_path):
    from subjectdiff.datagen.stages.common import decode_item

    photos = [p.read_bytes() for p in PHOTOS[:3]]
    (tmp_path / "beside.jpg").write_bytes(photos[2])
    images = [
        {"bytes": photos[0], "path": "astronaut.jpg"},
        {"bytes": photos[1], "path": None},
        {"bytes": None, "path": None},  # nothing to read
        {"bytes": b"\xff\xd8 not a jpeg", "path": "broken.jpg"},
        {"bytes": None, "path": "beside.jpg"},  # datasets' "path only" rows: relative to the Parquet
        {"bytes": None, "path": "gone.jpg"},
        None,
    ]
    hf_parquet(tmp_path / "train.parquet", images, ["a cosmonaut", None, "c", "d", "e", "f", "g"], row_group_size=3)
    src = str(tmp_path / "train.parquet")
    assert detect(src) == "list"
    counts, plan = plan_rows(src, tmp_path)
    assert counts == {"00000": 7} and all(r["error"] is None and r["column"] == "image" for r in plan)
    assert [(r["source"], r["path"], r["offset"]) for r in plan] == [(f"{src}#row={i}", src, i) for i in range(7)]
    assert [r["alt_text"] for r in plan] == ["a cosmonaut", None, "c", "d", "e", "f", "g"]
    assert [read(plan[i]) for i in (0, 1, 4)] == [photos[0], photos[1], photos[2]]

    where = f"{src} row index {{}}, column 'image'".format
    for i, reason in (
        (2, "the image bytes are null and there is no path to read instead"),
        (5, "the image bytes are null and its path 'gone.jpg' cannot be read: no such file"),
        (6, "the image is null"),
    ):
        with pytest.raises(UnitReadError) as e:
            read(plan[i])
        assert str(e.value) == f"{where(i)}: {reason}"
    broken = decode_item(plan[3]["source"], read(plan[3]))  # bytes that are no image fail at decode, not read
    assert broken["failure"]["stage"] == "decode" and "undecodable image" in broken["failure"]["reason"]
    with pytest.raises(UnitReadError, match=r"row index 9, column 'image': no such row; the file has 7 rows$"):
        read_unit(src, 9, -1, "image")

    # A plain binary column under another name, named with --image-column (in any case).
    pq.write_table(pa.table({"Name": ["x", "y"], "JPEG": [photos[0], photos[1]]}), tmp_path / "bin.parquet")
    _, plan = plan_rows(str(tmp_path / "bin.parquet"), tmp_path, image_column="jpeg", caption_column="name")
    assert [(r["column"], r["alt_text"]) for r in plan] == [("JPEG", "x"), ("JPEG", "y")]
    assert [read(r) for r in plan] == photos[:2]


def test_an_image_struct_column_comes_before_path_columns_and_under_any_name(tmp_path):
    photo = PHOTOS[0].read_bytes()
    table = pa.table({"path": ["/nowhere/original.jpg"], "image": pa.array([{"bytes": photo, "path": None}], HF_IMAGE)})
    pq.write_table(table, tmp_path / "both.parquet")  # `path` names a file on the machine that made the dataset
    _, plan = plan_rows(str(tmp_path / "both.parquet"), tmp_path)
    assert plan[0]["column"] == "image" and read(plan[0]) == photo
    pq.write_table(table.rename_columns(["file", "png_image"]), tmp_path / "other.parquet")
    _, plan = plan_rows(str(tmp_path / "other.parquet"), tmp_path)
    assert plan[0]["column"] == "png_image" and read(plan[0]) == photo


def test_a_laion_parquet_plans_one_url_per_row_and_a_404_says_so(tmp_path, http_dir):
    root, base = http_dir
    for p in PHOTOS[:3]:
        (root / p.name).write_bytes(p.read_bytes())
    urls = [f"{base}/{p.name}" for p in PHOTOS[:3]] + [f"{base}/gone.jpg"]
    texts = [f"a photo of {p.stem}" for p in PHOTOS[:3]] + ["lost"]
    n = len(urls)
    pq.write_table(
        pa.table(
            {  # the columns of LAION-400M's metadata Parquet
                "SAMPLE_ID": list(range(n)),
                "URL": urls,
                "TEXT": texts,
                "HEIGHT": [512] * n,
                "WIDTH": [512] * n,
                "LICENSE": ["?"] * n,
                "NSFW": ["UNLIKELY"] * n,
                "similarity": [0.3] * n,
            }
        ),
        tmp_path / "laion.parquet",
    )
    _, plan = plan_rows(str(tmp_path / "laion.parquet"), tmp_path)
    assert [(r["source"], r["alt_text"], r["column"]) for r in plan] == [(u, t, None) for u, t in zip(urls, texts)]
    assert [read(r) for r in plan[:3]] == [p.read_bytes() for p in PHOTOS[:3]]
    with pytest.raises(UnitReadError) as e:
        read(plan[3])
    assert str(e.value).startswith(f"cannot read {base}/gone.jpg: HTTP 404")


def test_column_names_match_in_any_case_and_can_be_named(tmp_path):
    photo = str(PHOTOS[0])
    (tmp_path / "a.csv").write_text(f"FilePath,Alt_Text\n{photo},a photo\n")
    _, plan = plan_rows(str(tmp_path / "a.csv"), tmp_path)
    assert [(r["source"], r["alt_text"]) for r in plan] == [(photo, "a photo")]

    b = str(tmp_path / "b.parquet")
    pq.write_table(pa.table({"Photo": [photo], "Prompt": ["named"], "caption": ["default"], "n": [1]}), b)
    _, plan = plan_rows(b, tmp_path, image_column="PHOTO", caption_column="prompt")
    assert [(r["source"], r["alt_text"]) for r in plan] == [(photo, "named")]
    _, plan = plan_rows(b, tmp_path, image_column="Photo")
    assert plan[0]["alt_text"] == "default"
    with pytest.raises(SourceError, match=r"no image column; .*--image-column; its columns are \['Photo'"):
        plan_rows(b, tmp_path)
    columns = "['Photo', 'Prompt', 'caption', 'n']"
    for kw, want in (
        ({"image_column": "picture"}, "no column 'picture' (--image-column)"),
        ({"image_column": "photo", "caption_column": "title"}, "no column 'title' (--caption-column)"),
    ):
        for call in (
            lambda kw=kw: detect(b, **kw),
            lambda kw=kw: plan_rows(b, tmp_path, **kw),
        ):  # detect: before any run
            with pytest.raises(SourceError) as e:
                call()
            assert str(e.value) == f"{b}: {want}; its columns are {columns}"
    with pytest.raises(SourceError, match="column 'n' holds int64; an image column holds paths or URLs"):
        plan_rows(b, tmp_path, image_column="N")


def test_consecutive_parquet_rows_read_their_row_group_once(tmp_path, flaky):
    root, _ = flaky
    images = [jpeg(i) for i in range(100)]
    with fsspec.open(root.replace("flaky://", "memory://") + "train.parquet", "wb") as f:
        hf_parquet(f, [{"bytes": b, "path": None} for b in images], [None] * 100, row_group_size=50)
    _, plan = plan_rows(root + "train.parquet", tmp_path)
    FlakyFS.opens = 0  # FlakyFS counts every open of a file for reading
    assert [read(r) for r in plan[:50]] == images[:50] and FlakyFS.opens == 1
    assert [read(r) for r in plan[50:]] == images[50:] and FlakyFS.opens == 2
    assert read(plan[7]) == images[7] and FlakyFS.opens == 3  # one row group is kept per process, the last

    # A local file rewritten in place is read afresh, not served from what was kept.
    local = tmp_path / "local.parquet"
    hf_parquet(local, [{"bytes": jpeg(1), "path": None}], [None])
    assert read_unit(str(local), 0, -1, "image") == jpeg(1)
    hf_parquet(local, [{"bytes": jpeg(2, size=32), "path": None}], [None])
    assert read_unit(str(local), 0, -1, "image") == jpeg(2, size=32)


def test_a_broken_row_group_fails_each_of_its_rows_with_one_reason(tmp_path, flaky):
    root, sleeps = flaky
    buf = io.BytesIO()
    hf_parquet(buf, [{"bytes": jpeg(i), "path": None} for i in range(20)], [None] * 20, row_group_size=10)
    data = bytearray(buf.getvalue())
    chunk = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(1).column(0)  # image.bytes, rows 10-19
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data[start : start + 40] = b"\xff" * 40  # its page header
    put(root.replace("flaky://", "memory://") + "broken.parquet", bytes(data))
    url = root + "broken.parquet"
    assert read_unit(url, 3, -1, "image") == jpeg(3)
    FlakyFS.opens = 0
    reasons = []
    for row in range(10, 20):
        with pytest.raises(UnitReadError) as e:
            read_unit(url, row, -1, "image")
        reasons.append(str(e.value).removeprefix(f"{url} row index {row}, column 'image': "))
    assert FlakyFS.opens == 3 and sleeps == [0.2, 0.8]  # the first row tried 3 times; the others failed at once
    assert len(set(reasons)) == 1 and reasons[0].startswith("cannot read its row group 1 (row indices 10 to 19): ")
    assert reasons[0].endswith("(after 3 attempts)") and "\n" not in reasons[0]


def test_hf_urls_fail_clearly_without_a_hub(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    url = "hf://datasets/google/dreambooth/data/train-00000-of-00001.parquet"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "subjectdiff",
            "datagen",
            "run",
            "--input",
            url,
            "--out",
            str(tmp_path / "out"),
            "--preset",
            "tiny",
            "--image-column",
            "image",
            "--caption-column",
            "text",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"input list {url!r} cannot be read: " in proc.stderr and "offline" in proc.stderr
    code = (
        "from subjectdiff.datagen.sources import SourceError, detect\n"
        "try:\n    detect('hf://datasets/google/dreambooth/dataset/dog')\n"
        "except SourceError as e:\n    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.startswith("input 'hf://datasets/google/dreambooth/dataset/dog' cannot be reached: ")


# ---- de-duplication and the plan file ------------------------------------------------------------------


def test_duplicates_are_planned_once_at_their_first_place(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(5):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg(i))
    order = [0, 1, 0, 2, 1, 3, 3, 4, 0]  # duplicates within and across write chunks
    (tmp_path / "list.csv").write_text("path\n" + "".join(f"imgs/{i}.jpg\n" for i in order))
    out = tmp_path / "out"
    out.mkdir()
    counts = write_plan(str(tmp_path / "list.csv"), out / "plan.parquet", 2, chunk=2, memory_limit="64MB")
    assert counts == {"00000": 2, "00001": 2, "00002": 1}
    assert sorted(p.name for p in out.iterdir()) == ["plan.parquet"]  # no temporary file or spill folder left
    table = pq.read_table(out / "plan.parquet")
    assert table.schema.remove_metadata() == PLAN_SCHEMA
    plan = table.to_pylist()
    assert [Path(r["source"]).name for r in plan] == [f"{i}.jpg" for i in range(5)]
    assert [r["idx"] for r in plan] == list(range(5))
    assert [r["shard"] for r in plan] == ["00000", "00000", "00001", "00001", "00002"]
    assert len({r["key"] for r in plan}) == 5 and all(r["offset"] == -1 and r["size"] == -1 for r in plan)

    (tmp_path / "empty").mkdir()
    assert write_plan(str(tmp_path / "empty"), out / "empty.parquet", 2) == {}
    assert pq.read_table(out / "empty.parquet").num_rows == 0


# ---- folders -------------------------------------------------------------------------------------------


def test_url_folders_are_listed_recursively_in_sorted_order(tmp_path, mem):
    for name in ("b.jpg", "a.png", "sub/c.jpeg", "sub/deeper/d.webp", "notes.txt", ".hidden.jpg"):
        put(mem + "imgs/" + name, jpeg(len(name)))
    assert detect(mem + "imgs/") == detect(mem + "imgs") == "folder"
    _, plan = plan_rows(mem + "imgs/", tmp_path)
    want = ["a.png", "b.jpg", "sub/c.jpeg", "sub/deeper/d.webp"]
    assert [r["source"] for r in plan] == [f"{mem}imgs/{n}" for n in want]
    assert read(plan[2]) == jpeg(len("sub/c.jpeg"))

    (tmp_path / "imgs").mkdir()  # file:// URLs take the same path; a local folder stays as it was
    (tmp_path / "imgs" / "x.jpg").write_bytes(jpeg(1))
    assert detect(f"file://{tmp_path}/imgs/") == "folder"
    _, plan = plan_rows(f"file://{tmp_path}/imgs/", tmp_path)
    assert [r["source"] for r in plan] == [f"file://{tmp_path}/imgs/x.jpg"] and read(plan[0]) == jpeg(1)

    put(mem + "shards/part/00000.tar", make_tar([("k.jpg", jpeg(7))]))
    assert detect(mem + "shards/") == "shards"
    _, plan = plan_rows(mem + "shards/", tmp_path)
    assert [r["source"] for r in plan] == [f"{mem}shards/part/00000.tar#k.jpg"] and read(plan[0]) == jpeg(7)
    with pytest.raises(SourceError, match="not a folder"):
        detect(mem + "nothing-here/")


def test_bucket_inputs_take_the_endpoint_from_the_storage_options(tmp_path, endpoint_in_options, s3_server):
    """SUBJECTDIFF_STORAGE_OPTIONS reaches datagen's inputs as it reaches its outputs: a bucket folder of images
    and a shard in it are listed, planned and read with the endpoint given there alone."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)  # the test's own client, told the endpoint directly
    fs.pipe(
        {
            f"{endpoint_in_options}/imgs/a.jpg": jpeg(1),
            f"{endpoint_in_options}/imgs/sub/b.png": jpeg(2),
            f"{endpoint_in_options}/shards/00000.tar": make_tar([("k.jpg", jpeg(3))]),
        }
    )
    src = f"{endpoint_in_options}/imgs/"
    assert detect(src) == "folder"
    _, plan = plan_rows(src, tmp_path)
    assert [r["source"] for r in plan] == [src + "a.jpg", src + "sub/b.png"]
    assert [read(r) for r in plan] == [jpeg(1), jpeg(2)]
    _, plan = plan_rows(f"{endpoint_in_options}/shards/00000.tar", tmp_path)
    assert [read(r) for r in plan] == [jpeg(3)]


# ---- shards and img2dataset ----------------------------------------------------------------------------


def test_brace_pattern_over_file_urls(tmp_path):
    for s in range(2):
        members = []
        for i in range(2):
            members += [(f"{s}{i}.jpg", jpeg(10 * s + i)), (f"{s}{i}.txt", f"alt {s}{i}".encode())]
        (tmp_path / f"{s:05d}.tar").write_bytes(make_tar(members))
    src = f"file://{tmp_path}/{{00000..00001}}.tar"
    assert detect(src) == "shards"
    counts, plan = plan_rows(src, tmp_path, shard_size=3)
    assert counts == {"00000": 3, "00001": 1}
    want = [f"file://{tmp_path}/{s:05d}.tar#{s}{i}.jpg" for s in range(2) for i in range(2)]
    assert [r["source"] for r in plan] == want
    assert [r["alt_text"] for r in plan] == ["alt 00", "alt 01", "alt 10", "alt 11"]
    assert [read(r) for r in plan] == [jpeg(0), jpeg(1), jpeg(10), jpeg(11)]


def test_img2dataset_failed_downloads_and_samples_without_an_image_are_accounted_for(tmp_path):
    src = tmp_path / "i2d"
    src.mkdir()
    bmp = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(bmp, "BMP")
    url = "https://example.com/{}.jpg".format
    (src / "00000.tar").write_bytes(
        make_tar(
            [
                ("000000000.jpg", jpeg(0)),
                ("000000000.txt", b"a cat"),
                ("000000000.json", json.dumps({"url": url(0)}).encode()),
                ("000000002.bmp", bmp.getvalue()),
                ("000000002.json", json.dumps({"url": url(2)}).encode()),
                ("000000003.txt", b"orphan"),
                ("000000003.json", json.dumps({"url": url(3)}).encode()),
            ]
        )
    )
    pq.write_table(
        pa.table(
            {
                "key": [f"00000000{i}" for i in range(5)],
                "url": [url(i) for i in range(5)],
                "status": ["success", "failed_to_download", "success", "success", "failed_to_resize"],
                "error_message": [None, "HTTP 404", None, None, "image too small"],
                "caption": list("abcde"),
            }
        ),
        src / "00000.parquet",
    )
    (src / "00000_stats.json").write_text("{}")
    # A second shard whose Parquet is not img2dataset's (no status column): read as plain shards.
    (src / "00001.tar").write_bytes(make_tar([("x.png", jpeg(9))]))
    pq.write_table(pa.table({"url": ["u"], "key": ["x"]}), src / "00001.parquet")
    assert detect(str(src)) == "shards"
    counts, plan = plan_rows(str(src), tmp_path)
    got = [(r["source"], r["error"]) for r in plan]
    assert got == [
        (url(0), None),
        (url(2), None),  # a .bmp member is an image (decode says whether records can store it)
        (url(3), "no image member in sample (members: txt, json)"),
        (url(1), "img2dataset failed_to_download: HTTP 404"),
        (url(4), "img2dataset failed_to_resize: image too small"),
        (f"{src}/00001.tar#x.png", None),
    ]
    assert counts == {"00000": 6} and plan[0]["alt_text"] == "a cat"
    assert read(plan[0]) == jpeg(0) and read(plan[1]) == bmp.getvalue() and read(plan[5]) == jpeg(9)


def test_a_corrupt_header_mid_tar_keeps_the_members_before_it(tmp_path):
    data = bytearray(make_tar([(f"k{i}.jpg", jpeg(i)) for i in range(3)]))
    second = offsets(bytes(data))["k1.jpg"].offset
    data[second : second + 160] = b"\x8f garbage " * 16  # tarfile alone would end the listing silently here
    (tmp_path / "a.tar").write_bytes(bytes(data))
    units = list_tar(str(tmp_path / "a.tar"))
    assert [(u.source, u.error is None) for u in units] == [
        (f"{tmp_path}/a.tar#k0.jpg", True),
        (f"{tmp_path}/a.tar#<after 1 samples>", False),
    ]
    assert "invalid tar header" in units[1].error
    assert read_unit(units[0].path, units[0].offset, units[0].size) == jpeg(0)


def test_a_read_error_partway_keeps_the_members_before_it(flaky):
    root, _ = flaky
    data = make_tar([(f"k{i}.jpg", jpeg(i)) for i in range(3)])
    put(root.replace("flaky://", "memory://") + "a.tar", data)
    FlakyFS.read_limit = offsets(data)["k2.jpg"].offset + 10  # the 3rd header cannot be read
    units = list_tar(root + "a.tar")
    assert [u.source.rsplit("#")[1] for u in units] == ["k0.jpg", "k1.jpg", "<after 2 samples>"]
    assert "read timed out" in units[2].error and units[0].error is None


def test_cut_tars_and_unopenable_tars(tmp_path):
    members = [("a.jpg", jpeg(1)), ("a.txt", b"alt a " * 40), ("b.jpg", jpeg(2)), ("b.txt", b"alt b " * 40)]
    data = make_tar(members)
    m = offsets(data)
    (tmp_path / "cut_in_text.tar").write_bytes(data[: m["b.txt"].offset_data + 30])
    units = list_tar(str(tmp_path / "cut_in_text.tar"))
    assert [u.source.rsplit("#")[1] for u in units] == ["a.jpg", "b.jpg", "<after 2 samples>"]
    assert units[1].error is None and "unexpected end" in units[2].error  # nothing else would fail for it

    (tmp_path / "cut_in_image.tar").write_bytes(data[: m["b.jpg"].offset_data + 30])
    units = list_tar(str(tmp_path / "cut_in_image.tar"))
    assert [(u.source.rsplit("#")[1], u.error) for u in units] == [("a.jpg", None), ("b.jpg", None)]
    with pytest.raises(OSError, match="truncated tar member"):  # the cut image fails when read: accounted for
        read_unit(units[1].path, units[1].offset, units[1].size)

    (tmp_path / "junk.tar").write_bytes(b"not a tar at all " * 100)
    for name in ("junk.tar", "missing.tar"):
        (unit,) = list_tar(str(tmp_path / name))
        assert unit.source == str(tmp_path / name) and unit.error.startswith("unreadable tar: ")


def test_map_urls_lists_shards_through_the_given_map(tmp_path):
    for s in range(4):
        (tmp_path / f"{s:05d}.tar").write_bytes(make_tar([(f"{s}{i}.jpg", jpeg(s * 3 + i)) for i in range(3)]))
    src = str(tmp_path / "{00000..00003}.tar")
    calls = []

    def threads(fn, urls):
        pickle.dumps(fn)  # it will travel to Ray workers
        calls.append(fn)
        with ThreadPoolExecutor(2) as ex:
            yield from ex.map(fn, urls)

    default = plan_rows(src, tmp_path, shard_size=5)
    assert plan_rows(src, tmp_path, shard_size=5, map_urls=threads) == default
    assert calls == [list_tar] and len(default[1]) == 12


# ---- reading units -------------------------------------------------------------------------------------


def test_read_unit_retries_transient_errors_only(tmp_path, flaky):
    root, sleeps = flaky
    put(root.replace("flaky://", "memory://") + "a.jpg", jpeg(3))
    FlakyFS.fail_opens = 2
    assert read_unit(root + "a.jpg", -1, -1) == jpeg(3) and FlakyFS.opens == 3 and sleeps == [0.2, 0.8]

    FlakyFS.opens, FlakyFS.fail_opens = 0, 3
    sleeps.clear()
    with pytest.raises(UnitReadError) as e:
        read_unit(root + "a.jpg", -1, -1)
    assert str(e.value) == f"cannot read {root}a.jpg: ConnectionError: connection reset by peer (after 3 attempts)"
    assert FlakyFS.opens == 3 and sleeps == [0.2, 0.8]

    n = len(jpeg(3)) - 10
    FlakyFS.opens, FlakyFS.fail_opens, FlakyFS.short_reads = 0, 0, 1  # a remote short read is retried
    assert read_unit(root + "a.jpg", 10, n) == jpeg(3)[10:] and FlakyFS.opens == 2

    FlakyFS.opens, FlakyFS.short_reads = 0, 5
    with pytest.raises(OSError, match="truncated tar member"):
        read_unit(root + "a.jpg", 10, n)
    assert FlakyFS.opens == 3

    sleeps.clear()  # permanent errors are raised at once
    with pytest.raises(UnitReadError, match="^cannot read flaky://.*/missing.jpg: no such file$"):
        read_unit(root + "missing.jpg", -1, -1)
    (tmp_path / "short.tar").write_bytes(b"x" * 10)
    with pytest.raises(UnitReadError, match="short.tar at byte 5: truncated tar member: read 5 of 8 bytes$"):
        read_unit(str(tmp_path / "short.tar"), 5, 8)
    with pytest.raises(UnitReadError, match="a folder, not a file"):
        read_unit(str(tmp_path), -1, -1)
    assert sleeps == []


# ---- phone photos --------------------------------------------------------------------------------------


def test_an_mpo_phone_photo_is_stored_as_its_jpeg_bytes_and_reads_as_its_first_picture():
    import numpy as np
    from skimage import data

    from subjectdiff.catalogs.reader import decode_record
    from subjectdiff.datagen.stages.common import decode_item

    first, second = Image.fromarray(data.astronaut()), Image.fromarray(data.chelsea())  # 512x512, 451x300
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[second])
    mpo = buf.getvalue()
    with Image.open(io.BytesIO(mpo)) as im:
        assert (im.format, im.n_frames) == ("MPO", 2)
    alone = io.BytesIO()
    first.save(alone, "JPEG")  # the same picture as a plain JPEG, same encoder settings
    with Image.open(alone) as im:
        want = np.asarray(im.convert("RGB"))

    item = decode_item("phone/IMG_0001.jpg", mpo)
    assert "failure" not in item and item["image_format"] == "jpeg" and item["image_bytes"] == mpo
    assert np.array_equal(item["image"], want)

    # What a record reader gets back from those bytes: the first picture, at the size the record states.
    h, w = item["image"].shape[:2]
    meta = {"key": item["key"], "caption": "", "height": h, "width": w, "source": item["source"], "objects": []}
    rec = decode_record({"__key__": item["key"], "json": json.dumps(meta).encode(), "jpg": mpo})
    assert np.array_equal(rec.image, want) and rec.image_ext == "jpg"


# ---- end to end ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_hugging_face_parquet_through_datagen_run_accounts_for_every_row(tmp_path):
    from skimage import data

    from subjectdiff.catalogs import catalog
    from subjectdiff.datagen.job import preset
    from subjectdiff.datagen.run import run

    mpo = io.BytesIO()
    Image.fromarray(data.astronaut()).save(mpo, "MPO", save_all=True, append_images=[Image.fromarray(data.coffee())])
    images = [{"bytes": p.read_bytes(), "path": p.name} for p in PHOTOS] + [
        {"bytes": mpo.getvalue(), "path": "IMG_0001.JPG"},
        {"bytes": None, "path": None},
        {"bytes": b"not an image", "path": "broken.jpg"},
        {"bytes": None, "path": "gone.jpg"},
    ]
    texts = [f"alt text {i}" for i in range(len(images))]
    src = str(tmp_path / "train-00000-of-00001.parquet")
    hf_parquet(src, images, texts, row_group_size=4)
    cfg = preset("tiny")
    cfg.pipeline.shard_size = cfg.pipeline.batch_size = 4
    for stage in (cfg.stages.caption, cfg.stages.ground, cfg.stages.segment):
        stage.batch_size = 4
    cfg.pipeline.fuse = True  # one actor loads the models: the source is tested here, not the pools
    out = tmp_path / "out"
    summary = run(src, out, cfg, image_column="Image", caption_column="TEXT", progress_every=60)

    n, mpo_row = len(images), len(PHOTOS)
    assert summary.incomplete == [] and summary.ok + summary.failed == n
    rows = catalog.query(
        out,
        "SELECT source, NULL AS stage, NULL AS reason, alt_text, image_ext FROM samples "
        "UNION ALL SELECT source, stage, reason, NULL, NULL FROM failures",
    ).to_pylist()
    assert sorted(r["source"] for r in rows) == sorted(f"{src}#row={i}" for i in range(n))  # each row once
    by_row = {int(r["source"].rsplit("=", 1)[1]): r for r in rows}
    # Reasons group (the source names the row; the worker's log has the whole message).
    assert (by_row[n - 3]["stage"], by_row[n - 3]["reason"]) == (
        "read",
        "the image bytes are null and there is no path to read instead",
    )
    assert (by_row[n - 1]["stage"], by_row[n - 1]["reason"]) == (
        "read",
        "the image bytes are null and its path cannot be read: no such file",
    )
    assert by_row[n - 2]["stage"] == "decode" and by_row[n - 2]["reason"].startswith("undecodable image")
    assert by_row[mpo_row]["stage"] not in ("read", "decode")  # the phone photo is not lost for its container
    oks = [(i, r) for i, r in by_row.items() if r["stage"] is None]
    assert oks and all(r["alt_text"] == texts[i] and r["image_ext"] == "jpg" for i, r in oks)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(0, 300),
    group=st.integers(1, 64),
    batch=st.integers(1, 100),
    columns=st.sampled_from([None, ["key"], ["value", "key"]]),
)
def test_row_group_batches_give_every_row_once_in_order(tmp_path_factory, rows, group, batch, columns):
    """storage.row_group_batches (the plan's, the lists' and the pairs file's reader): for any file, its rows in
    file order, batches of at most BATCH rows, the columns asked for."""
    path = tmp_path_factory.mktemp("rg") / "t.parquet"
    table = pa.table({"key": [f"{i:06d}" for i in range(rows)], "value": list(range(rows))})
    pq.write_table(table, path, row_group_size=group)
    batches = list(storage.row_group_batches(pq.ParquetFile(path), batch, columns))
    assert all(b.num_rows <= batch for b in batches)
    want = table if columns is None else table.select(columns)
    got = pa.Table.from_batches(batches, schema=want.schema)
    assert got.equals(want)
