"""datagen.sources: planning every kind of input (folders, shards, img2dataset, lists; local and fsspec URLs)
into a plan where every input is accounted for, and reading units back. CPU only, no network, no Ray."""

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
from PIL import Image

from datagen import sources
from datagen.sources import PLAN_SCHEMA, SourceError, detect, list_tar, read_unit, write_plan


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
    return read_unit(row["path"], row["offset"], row["size"])


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
    monkeypatch.setattr(sources.time, "sleep", sleeps.append)
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
    assert plan[3]["error"] == "list row 4 has no image path"  # a row without a path is accounted for
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
    (src / "00000.tar").write_bytes(make_tar([
        ("000000000.jpg", jpeg(0)), ("000000000.txt", b"a cat"),
        ("000000000.json", json.dumps({"url": url(0)}).encode()),
        ("000000002.bmp", bmp.getvalue()), ("000000002.json", json.dumps({"url": url(2)}).encode()),
        ("000000003.txt", b"orphan"), ("000000003.json", json.dumps({"url": url(3)}).encode()),
    ]))
    pq.write_table(pa.table({
        "key": [f"00000000{i}" for i in range(5)], "url": [url(i) for i in range(5)],
        "status": ["success", "failed_to_download", "success", "success", "failed_to_resize"],
        "error_message": [None, "HTTP 404", None, None, "image too small"], "caption": list("abcde"),
    }), src / "00000.parquet")
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
    data[second: second + 160] = b"\x8f garbage " * 16  # tarfile alone would end the listing silently here
    (tmp_path / "a.tar").write_bytes(bytes(data))
    units = list_tar(str(tmp_path / "a.tar"))
    assert [(u.source, u.error is None) for u in units] == [(f"{tmp_path}/a.tar#k0.jpg", True),
                                                            (f"{tmp_path}/a.tar#<after 1 samples>", False)]
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
    with pytest.raises(ConnectionError):
        read_unit(root + "a.jpg", -1, -1)
    assert FlakyFS.opens == 3 and sleeps == [0.2, 0.8]

    n = len(jpeg(3)) - 10
    FlakyFS.opens, FlakyFS.fail_opens, FlakyFS.short_reads = 0, 0, 1  # a remote short read is retried
    assert read_unit(root + "a.jpg", 10, n) == jpeg(3)[10:] and FlakyFS.opens == 2

    FlakyFS.opens, FlakyFS.short_reads = 0, 5
    with pytest.raises(OSError, match="truncated tar member"):
        read_unit(root + "a.jpg", 10, n)
    assert FlakyFS.opens == 3

    sleeps.clear()  # permanent errors are raised at once
    with pytest.raises(FileNotFoundError):
        read_unit(root + "missing.jpg", -1, -1)
    (tmp_path / "short.tar").write_bytes(b"x" * 10)
    with pytest.raises(OSError, match="truncated tar member: read 5 of 8 bytes"):
        read_unit(str(tmp_path / "short.tar"), 5, 8)
    with pytest.raises(IsADirectoryError):
        read_unit(str(tmp_path), -1, -1)
    assert sleeps == []
