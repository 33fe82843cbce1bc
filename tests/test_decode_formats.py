"""Every common image decodes correctly or says why not (issue #17): 16-bit and float depths, transparency, EXIF
orientation, HEIC/AVIF, GIF/BMP/TIFF, a 108 MP photo, and folder files that are no images counted.

Each file is written here with Pillow, pillow-heif or tifffile from scikit-image's photographs. A record's
stored bytes are read back through catalogs.reader.decode_record (which applies no EXIF and checks the size
against the record's): what training reads must be the pixels the stages saw.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data

from subjectdiff.catalogs.reader import decode_record
from subjectdiff.catalogs.schema import Record
from subjectdiff.datagen.assemble import to_record
from subjectdiff.datagen.config import DecodeConfig
from subjectdiff.datagen.stages.common import decode_item

ORIENTATION_UNDO = {  # EXIF orientation -> the transpose that makes an upright image into the stored one
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def exif(orientation: int) -> Image.Exif:
    e = Image.Exif()
    e[0x0112] = orientation
    return e


def png16(a: np.ndarray) -> bytes:
    """A 16-bit PNG of A ((H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA uint16), written by hand: Pillow writes
    16-bit gray only."""
    h, w = a.shape[:2]
    color = {1: 0, 3: 2, 4: 6}[1 if a.ndim == 2 else a.shape[2]]  # PNG colour types: gray, RGB, RGBA
    raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def stored(item: dict) -> tuple[Record, np.ndarray]:
    """The record an item becomes (no objects), and the pixels catalogs.reader decodes from its stored bytes."""
    assert "failure" not in item, item.get("failure")
    item.update(caption="a photo", nouns=[], detections=[], masks=[], mask_scores=[])
    rec = to_record(item)
    assert isinstance(rec, Record), rec
    sample = {"__key__": rec.key, "json": json.dumps(rec.meta_json()).encode(), rec.image_ext: rec.image}
    back = decode_record(sample, decode_masks=False)  # raises when the bytes' size is not the record's
    return rec, back.image


def passes_through(item: dict, source: bytes) -> bool:
    return item["image_bytes"] == source and "decode" not in item.get("extra", {})


# ------------------------------------------------------------------------------------------------ depth


def test_16bit_gray_png_is_scaled_to_8_bits_not_clipped():
    cam = data.camera()
    item = decode_item("g16.png", png16(cam.astype(np.uint16) * 257))  # what `convert("RGB")` made ~90 % white
    rec, back = stored(item)
    assert np.array_equal(item["image"], np.repeat(cam[..., None], 3, axis=2))  # v * 257 / 257: exact
    assert (item["image"] == 255).mean() == pytest.approx((cam == 255).mean())
    assert np.array_equal(back, item["image"]) and rec.image_ext == "png"
    assert rec.extra["decode"] == ["16bit->8bit"]


def test_16bit_rgb_png_and_tiff_match_a_correct_8_bit_conversion():
    """A 48-bit PNG Pillow already reduces to its high bytes (this pins it: its bytes pass through); a 48-bit
    TIFF was refused as a format records cannot store, and is now converted."""
    import tifffile

    ast = data.astronaut()
    wide = ast.astype(np.uint16) * 257 + np.uint16(100)  # not a multiple of 257: rounding shows
    want = np.rint(wide / 257.0)
    png = png16(wide)
    item = decode_item("rgb48.png", png)
    rec, back = stored(item)
    assert np.abs(item["image"] - want).max() <= 1 and abs(item["image"].mean() - want.mean()) < 0.5
    assert np.array_equal(back, item["image"]) and passes_through(item, png)

    buf = io.BytesIO()
    tifffile.imwrite(buf, wide, photometric="rgb")
    item = decode_item("rgb48.tif", buf.getvalue())
    rec, back = stored(item)
    assert np.abs(item["image"] - want).max() <= 1 and abs(item["image"].mean() - want.mean()) < 0.5
    assert np.array_equal(back, item["image"]) and rec.extra["decode"] == ["tiff->png"]


def test_float_and_32bit_int_images_are_scaled_by_their_range():
    cam = data.camera()
    item = decode_item("f.tif", encode(Image.fromarray(cam.astype(np.float32) / 255), "TIFF"))
    rec, back = stored(item)
    assert np.abs(item["image"][..., 0].astype(int) - cam).max() <= 1
    assert rec.extra["decode"] == ["float->8bit", "tiff->png"] and np.array_equal(back, item["image"])
    wide = Image.fromarray(cam.astype(np.int32) * 1000 - 5000)  # outside 0-65535: its own range
    item = decode_item("i.tif", encode(wide, "TIFF"))
    stretched = np.rint((cam - cam.min()) * 255.0 / (cam.max() - cam.min()))
    assert np.abs(item["image"][..., 0] - stretched).max() <= 1
    assert item["extra"]["decode"] == ["int->8bit", "tiff->png"]


# ------------------------------------------------------------------------------------------------ alpha


def cutout() -> tuple[np.ndarray, np.ndarray]:
    """(RGBA, transparent mask): the astronaut with its left third transparent (colour black under it)."""
    rgba = np.dstack([data.astronaut(), np.full((512, 512), 255, np.uint8)])
    clear = np.zeros((512, 512), bool)
    clear[:, :170] = True
    rgba[clear] = 0
    rgba[:, 170:200, 3] = 128  # a half-transparent band
    return rgba, clear


def test_transparent_pixels_are_composited_on_white_not_black():
    rgba, clear = cutout()
    item = decode_item("cut.png", encode(Image.fromarray(rgba), "PNG"))
    rec, back = stored(item)
    assert (item["image"][clear] == 255).all()  # was 0: black
    half = item["image"][:, 170:200].astype(int)
    assert np.abs(half - (rgba[:, 170:200, :3].astype(int) * 128 + 255 * 127) / 255).max() <= 1
    assert np.array_equal(item["image"][:, 200:], rgba[:, 200:, :3])  # opaque pixels as they are
    assert rec.extra["decode"] == ["alpha->background"] and np.array_equal(back, item["image"])


def test_background_is_a_setting():
    rgba, clear = cutout()
    item = decode_item("cut.png", encode(Image.fromarray(rgba), "PNG"), cfg=DecodeConfig(background=[0, 128, 255]))
    assert (item["image"][clear] == [0, 128, 255]).all()
    assert DecodeConfig(background="#00ff00").background == (0, 255, 0)
    with pytest.raises(ValueError, match="decode.background"):
        DecodeConfig(background="no such colour")
    with pytest.raises(ValueError, match="decode.background"):
        DecodeConfig(background=[0, 300, 0])


def test_palette_and_gray_alpha_transparency_and_opaque_alpha():
    chelsea = Image.fromarray(data.chelsea())
    pal = chelsea.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    idx = np.asarray(pal)
    t = int(idx[0, 0])
    gif = decode_item("p.gif", encode(pal, "GIF", transparency=t))
    assert (gif["image"][idx == t] == 255).all() and gif["extra"]["decode"] == ["alpha->background", "gif->png"]
    la = Image.merge("LA", (chelsea.convert("L"), Image.fromarray(np.where(idx == t, 0, 255).astype(np.uint8))))
    item = decode_item("la.png", encode(la, "PNG"))
    assert (item["image"][idx == t] == 255).all() and np.array_equal(stored(item)[1], item["image"])
    # An alpha channel that is opaque everywhere changes nothing: the bytes pass through.
    opaque = encode(chelsea.convert("RGBA"), "PNG")
    item = decode_item("opaque.png", opaque)
    assert passes_through(item, opaque) and np.array_equal(item["image"], data.chelsea())


# ----------------------------------------------------------------------------------------- orientation


def patched_photo() -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The cat, darkened, with a white patch: (upright image 451x300, the patch's xyxy box in pixels)."""
    a = data.chelsea() // 2
    box = (300, 40, 380, 100)
    a[box[1] : box[3], box[0] : box[2]] = 255
    return Image.fromarray(a), box


def bright_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """xyxy box (pixels, exclusive max) of the pixels brighter than 200 in every channel."""
    ys, xs = np.nonzero((image > 200).all(axis=2))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_gives_upright_pixels_size_and_boxes(orientation):
    upright, box = patched_photo()
    raw = upright.transpose(ORIENTATION_UNDO[orientation])  # the sensor's frame, as a phone stores it
    jpeg = encode(raw, "JPEG", quality=95, exif=exif(orientation))
    item = decode_item("phone.jpg", jpeg)
    rec, back = stored(item)
    assert (rec.width, rec.height) == upright.size == (451, 300)
    assert np.array_equal(back, item["image"])  # the stored bytes decode upright, without EXIF
    assert np.abs(np.array(bright_box(back)) - box).max() <= 2  # the patch where it is in the upright photo
    assert rec.extra["decode"] == ["exif_transpose", "jpeg->png"]
    # Off: the stored frame, bytes unchanged, as before.
    off = decode_item("phone.jpg", jpeg, cfg=DecodeConfig(exif_transpose=False))
    assert passes_through(off, jpeg) and off["image"].shape[:2] == raw.size[::-1]


def test_ordinary_files_pass_through_byte_for_byte():
    photo = Image.fromarray(data.coffee())
    for fmt, kw in (("JPEG", {}), ("JPEG", {"exif": exif(1)}), ("PNG", {}), ("WEBP", {"quality": 80})):
        raw = encode(photo, fmt, **kw)
        item = decode_item(f"c.{fmt.lower()}", raw)
        rec, back = stored(item)
        assert passes_through(item, raw) and rec.image == raw and np.array_equal(back, item["image"])


# -------------------------------------------------------------------------------------------- formats


def test_heic_and_avif_are_read_and_stored_as_png():
    from pillow_heif import register_heif_opener

    register_heif_opener()
    photo = data.chelsea()
    for fmt, tag in (("HEIF", "heif->png"), ("AVIF", "avif->png")):
        item = decode_item(f"phone.{fmt.lower()}", encode(Image.fromarray(photo), fmt, quality=90))
        rec, back = stored(item)
        assert np.abs(item["image"].astype(int) - photo).mean() < 4  # lossy, but the photo
        assert rec.image_ext == "png" and rec.extra["decode"] == [tag] and np.array_equal(back, item["image"])


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_gif_bmp_tiff_are_converted_first_frame(fmt):
    photo = Image.fromarray(data.coffee()).resize((200, 133))
    if fmt == "GIF":  # two frames: the record is the first
        raw = encode(photo, "GIF", save_all=True, append_images=[Image.new("RGB", photo.size, (255, 0, 0))])
    else:
        raw = encode(photo, fmt)
    item = decode_item(f"x.{fmt.lower()}", raw)
    rec, back = stored(item)
    with Image.open(io.BytesIO(raw)) as im:
        first = np.asarray(im.convert("RGB"))
    assert np.array_equal(item["image"], first) and np.array_equal(back, first)
    assert rec.extra["decode"] == (["first_frame"] if fmt == "GIF" else []) + [f"{fmt.lower()}->png"]
    refused = decode_item(f"x.{fmt.lower()}", raw, cfg=DecodeConfig(convert_formats=False))
    assert refused["failure"]["stage"] == "decode" and "decode.convert_formats" in refused["failure"]["reason"]


# ---------------------------------------------------------------------------------------- pixel limit


def test_108_megapixel_jpeg_becomes_a_record_and_is_downscaled_past_max_pixels():
    big = Image.new("L", (12000, 9000), 90)  # mostly flat: ~1 MB as JPEG
    big.paste(250, (6000, 3000, 9000, 6000))
    jpeg = encode(big, "JPEG", quality=90)
    del big
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        full = decode_item("big.jpg", jpeg)
        assert passes_through(full, jpeg) and full["image"].shape == (9000, 12000, 3)
        del full
        small = decode_item("big.jpg", jpeg, cfg=DecodeConfig(max_pixels=16_000_000))
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's own limit is back for everyone else
    h, w = small["image"].shape[:2]
    assert (w, h) == (4618, 3464) and w * h <= 16_000_000
    assert small["extra"] == {"decode": ["downscaled", "jpeg->png"], "original_size": [12000, 9000]}
    rec, back = stored(small)
    assert (rec.width, rec.height) == (w, h) and np.array_equal(back, small["image"])
    x0, y0, x1, y1 = bright_box(back)  # the bright square, at the same place relative to the image
    assert abs(x0 / w - 0.5) < 0.01 and abs(y0 / h - 1 / 3) < 0.01 and abs(x1 / w - 0.75) < 0.01


def test_an_image_beyond_twice_max_pixels_is_refused_before_decoding():
    png = encode(Image.new("RGB", (300, 300)), "PNG")
    item = decode_item("huge.png", png, cfg=DecodeConfig(max_pixels=40_000))
    assert item["failure"]["stage"] == "decode" and "decode.max_pixels" in item["failure"]["reason"]
    ok = decode_item("huge.png", png, cfg=DecodeConfig(max_pixels=50_000))  # 90000 <= 2 x 50000: downscaled
    assert ok["image"].shape == (223, 223, 3) and ok["extra"]["decode"] == ["downscaled"]


# ------------------------------------------------------------------------------------ config and plan


def test_decode_settings_load_from_overrides_and_change_the_plan_fingerprint():
    from subjectdiff.datagen.job import load_config
    from subjectdiff.datagen.plan import stages_fingerprint

    base = load_config("default")
    assert base.stages.decode == DecodeConfig() and base.stages.decode.background == (255, 255, 255)
    same = load_config("default", overrides=["decode.background=[255, 255, 255]"])
    assert stages_fingerprint(same.stages) == stages_fingerprint(base.stages)  # spelling does not matter
    for o in (
        "decode.exif_transpose=false",
        "decode.background='black'",
        "decode.max_pixels=1000000",
        "decode.convert_formats=false",
    ):
        assert stages_fingerprint(load_config("default", overrides=[o]).stages) != stages_fingerprint(base.stages), o
    with pytest.raises(ValueError, match="max_pixels"):
        load_config("default", overrides=["decode.max_pixels=0"])


# ------------------------------------------------------------------------------------------- sources


def test_folder_source_takes_heic_and_avif_and_counts_what_it_skips(tmp_path):
    from subjectdiff.datagen.sources import list_tar, write_plan

    jpeg = encode(Image.new("RGB", (8, 8)), "JPEG")
    for name in (
        "a.jpg",
        "b.HEIC",
        "c.avif",
        "d.heif",
        "sub/e.AVIF",
        "notes.txt",
        "sub/README.TXT",
        "LICENSE",
        ".DS_Store",
        "sub/._a.jpg",
        "data.json",
    ):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(jpeg)
    skipped: Counter = Counter()
    write_plan(str(tmp_path / "in"), tmp_path / "plan.parquet", 10, skipped=skipped)
    import pyarrow.parquet as pq

    sources = sorted(Path(s).name for s in pq.read_table(tmp_path / "plan.parquet").column("source").to_pylist())
    assert sources == ["a.jpg", "b.HEIC", "c.avif", "d.heif", "e.AVIF"]
    assert skipped == {".txt": 2, "hidden": 2, "no extension": 1, ".json": 1}
    # A tar sample's HEIC member is its image.
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, body in (("k1.heic", jpeg), ("k1.txt", b"alt"), ("k2.AVIF", jpeg)):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    units = list_tar(str(tmp_path / "s.tar"))
    assert [u.source.rsplit("#", 1)[1] for u in units] == ["k1.heic", "k2.AVIF"] and units[0].alt_text == "alt"
    assert all(u.error is None for u in units)


# ------------------------------------------------------------------------------------------- property

_SAVES = {  # format -> modes Pillow writes in it (checked: each reads back)
    "PNG": ["1", "L", "LA", "P", "PT", "RGB", "RGBA", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "WEBP": ["RGB", "RGBA"],
    "TIFF": ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"],
    "GIF": ["L", "P", "PT"],
    "BMP": ["1", "L", "P", "RGB"],
}
_EXIF_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF")


def synthetic(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    gray = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "1":
        return gray.convert("1")
    if mode == "LA":
        return Image.merge("LA", (gray, Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))))
    if mode in ("P", "PT"):
        pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
        if mode == "PT":
            pal.info["transparency"] = 0
        return pal
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
    if mode == "CMYK":
        return rgb.convert("CMYK")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.int32))
    if mode == "F":
        return Image.fromarray(rng.random((h, w), dtype=np.float32))
    return {"L": gray, "RGB": rgb}[mode]


@st.composite
def image_files(draw) -> tuple[bytes, tuple[int, int], int]:
    """(encoded file, upright (W, H), orientation) over formats, modes, sizes and EXIF orientations."""
    fmt = draw(st.sampled_from(sorted(_SAVES)))
    mode = draw(st.sampled_from(_SAVES[fmt]))
    w, h = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    orientation = draw(st.integers(1, 8)) if fmt in _EXIF_FORMATS else 1
    im = synthetic(mode, w, h, draw(st.integers(0, 2**16)))
    kw = {"exif": exif(orientation)} if orientation != 1 else {}
    if mode == "PT" and fmt == "GIF":
        kw["transparency"] = 0
    upright = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return encode(im, fmt, **kw), upright, orientation


@settings(max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(image_files())
def test_any_mode_size_and_orientation_decodes_upright_and_reads_back_the_same(case):
    raw, (w, h), orientation = case
    item = decode_item("x", raw)
    image = item["image"]
    assert image.dtype == np.uint8 and image.shape == (h, w, 3)
    rec, back = stored(item)
    assert (rec.width, rec.height) == (w, h) and np.array_equal(back, image)
    if "decode" not in rec.extra:
        assert rec.image == raw and orientation == 1
    again = decode_item("x", rec.image)  # stored bytes are a fixed point: nothing left to do
    assert passes_through(again, rec.image) and np.array_equal(again["image"], image)


# ----------------------------------------------------------------------------------------- end to end


def mixed_folder(d: Path) -> dict[str, list[str] | None]:
    """A small folder of what phones and the web give: {file name: the record's extra["decode"] expected
    (None: bytes unchanged)}, plus a broken AVIF and two files that are no images."""
    from pillow_heif import register_heif_opener

    register_heif_opener()
    small = lambda a, w: Image.fromarray(a).resize((w, round(w * a.shape[0] / a.shape[1])))
    (d / "sub").mkdir(parents=True)
    cat = small(data.chelsea(), 160)
    (d / "phone.jpg").write_bytes(encode(cat.transpose(ORIENTATION_UNDO[6]), "JPEG", quality=95, exif=exif(6)))
    (d / "gray16.png").write_bytes(png16(np.asarray(small(data.camera(), 128)).astype(np.uint16) * 257))
    rgba = np.dstack([np.asarray(small(data.astronaut(), 128)), np.full((128, 128), 255, np.uint8)])
    rgba[:, :40, 3] = 0
    (d / "cut.png").write_bytes(encode(Image.fromarray(rgba), "PNG"))
    (d / "sub" / "IMG_0001.HEIC").write_bytes(encode(small(data.coffee(), 160), "HEIF", quality=90))
    (d / "plain.jpg").write_bytes(encode(small(data.rocket(), 160), "JPEG"))
    (d / "broken.avif").write_bytes(b"not an AVIF file")
    (d / "notes.txt").write_text("no image\n")
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return {
        "phone.jpg": ["exif_transpose", "jpeg->png"],
        "gray16.png": ["16bit->8bit"],
        "cut.png": ["alpha->background"],
        "IMG_0001.HEIC": ["heif->png"],
        "plain.jpg": None,
    }


@pytest.mark.slow
def test_a_folder_of_phone_and_web_formats_through_datagen_run(tmp_path):
    """Every image file ends as exactly one sample or failure, the files that are no images are reported by
    extension, and each record's stored bytes read back at its size (RecordReader checks) and upright."""
    from subjectdiff.catalogs import catalog
    from subjectdiff.catalogs.reader import RecordReader
    from subjectdiff.datagen.run import run
    from tests.pipelines import tiny_cfg

    src, out = tmp_path / "in", tmp_path / "out"
    want = mixed_folder(src)
    cfg = tiny_cfg(shard_size=4, batch_size=4)
    cfg.pipeline.fuse = True  # one actor loads the models: the decoding is tested here, not the pools
    summary = run(str(src), out, cfg, progress_every=60)
    images = sorted(
        str(p) for p in src.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".png", ".heic", ".avif")
    )
    rows = catalog.query(
        out, "SELECT source, NULL AS stage FROM samples UNION ALL SELECT source, stage FROM failures"
    ).to_pylist()
    assert sorted(r["source"] for r in rows) == images and summary.ok + summary.failed == len(images)
    assert {Path(r["source"]).name: r["stage"] for r in rows}["broken.avif"] == "decode"
    assert (
        summary.skipped_files == {".txt": 1, "hidden": 1}
        and "skipped (no image files): 1 .txt, 1 hidden" in summary.line()
    )
    assert json.loads((out / "manifest.json").read_text())["skipped_files"] == {".txt": 1, "hidden": 1}
    records = {Path(r.source).name: r for r in RecordReader(out)}  # decodes every image, checks its size
    assert set(records) == set(want)  # the tiny models (seeded) find objects in each of these photos
    for name, r in records.items():
        assert r.meta["extra"].get("decode") == want[name], name
        if want[name] is None:
            assert r.image_bytes == (src / name).read_bytes()
    assert (records["phone.jpg"].width, records["phone.jpg"].height) == (160, 106)  # upright, as stored raw 106x160
