"""Videos as datagen inputs: one plan unit per video, a few sampled frames per shot, each frame an item like a photo.

    read_video_items(row) -> items          what datagen/decode.py calls for a plan row whose `media` is "video"
      1. scan: decode every frame once, downscaled (SCAN_WIDTH wide), streamed through PySceneDetect's content
         detector; keeps only each frame's pts and key-frame flag (16 bytes a frame), never a picture; then shots
         shorter than `video.min_shot_s` merged (merge_short_shots), timed as the sampling times them
      2. sample_frames: which frames of which shot (`video.frames_per_shot`, `min_gap_s`, `max_frames`), the gap
         in frames at the average rate, or in the frames' own times where the rate varies (Scan.vfr_times)
      3. grab: decode only the sampled frames at full size, seeking to the key frame before each one where the
         container has pts for every frame, else decoding forward
    Each sampled frame becomes an item keyed `make_key(f"{video}#frame={n}")` (its source is that string), carrying
    `video` = {source, shot, frame, time} (catalogs.schema.VideoFrame) and `unit_key`, the plan key of its video
    (what a retry redoes: the whole video, datagen/retry.py). Its pixels are stored as JPEG (FRAME_QUALITY): the
    video's own frames are already lossy, and a PNG of a 1080p frame is ten times larger. A video with a display
    rotation or mirror (a phone's portrait video, a selfie camera's) has its frames turned upright first, as
    players show them, and `extra["decode"]` says so (`hflip`, then `rotate_90`: degrees counter-clockwise), as a
    photo's says `exif_transpose`.

A video that cannot be opened, or whose decoding breaks partway (a truncated or corrupt file), gives one more
item, failed at "decode", keyed by the video's plan key, its source the video itself, its VideoFrame the frame
where decoding stopped; the frames sampled from the shots found before the break are kept as records. Every
video gives at least one item: one with no frame at all fails ("the video has no frames").

PyAV and PySceneDetect are imported where a video is read (they are heavy, and only decode tasks need them).
"""

from __future__ import annotations

import bisect
import heapq
import io
import math
import posixpath
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from subjectdiff.catalogs.schema import make_key
from subjectdiff.datagen.config import DecodeConfig, VideoConfig
from subjectdiff.datagen.stages.common import decode_item, fail

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv")
SCAN_WIDTH = 256  # shot detection runs on frames this wide (PySceneDetect's own downscale targets about 256)
FRAME_QUALITY = 95  # JPEG quality of a stored frame

Item = dict[str, Any]


def is_video(name: str) -> bool:
    """Whether a file, tar member or list path NAME is read as a video (by its extension, in any case)."""
    return posixpath.basename(name.split("?", 1)[0]).lower().endswith(VIDEO_SUFFIXES)


# ------------------------------------------------------------------------------------------------ sampling


def sample_frames(
    shots: list[tuple[int, int]],
    fps: float,
    frames_per_shot: int,
    min_gap_s: float,
    max_frames: int,
    times: list[float] | None = None,
) -> list[tuple[int, int]]:
    """Which frames to keep: [(shot index, frame index)], sorted by frame.

    shots: [start, end) frame ranges, in order, not overlapping. Within a shot the frames are at least
    min_gap_s apart (ceil(min_gap_s * fps) frames, and never the same frame twice), at most frames_per_shot,
    spread evenly and kept off the cuts when there is room. Across a cut no gap is asked: the pictures differ.
    At most max_frames in all: each shot of nonzero length gets one first (the longest shots, when there are
    more shots than max_frames: shots spread evenly over the video, the last one always among them, so the
    largest shot index sampled + 1 is the number of shots), then the rest go, one at a time, to the shot with the
    most frames per frame taken.
    times: each frame's presentation time in seconds, non-decreasing, covering every shot (a variable frame
    rate video's: Scan.vfr_times); the gap is then min_gap_s of these times, not a count of frames."""
    gap = max(1, math.ceil(min_gap_s * fps - 1e-9))
    lengths = [max(0, e - s) for s, e in shots]
    if times is None:
        caps = [min(frames_per_shot, 1 + (n - 1) // gap) if n > 0 else 0 for n in lengths]
    else:
        caps = [min(frames_per_shot, len(_greedy(times, s, e, min_gap_s, frames_per_shot))) for s, e in shots]
    live = [i for i, n in enumerate(lengths) if n > 0]
    if len(live) > max_frames:  # spread over the video, the last shot always in (so its index counts the shots)
        live = [live[len(live) - 1 - round(j * (len(live) - 1) / max(1, max_frames - 1))] for j in range(max_frames)]
    take = dict.fromkeys(live, 1)
    budget = max_frames - len(take)
    heap = [(-lengths[i], i) for i in live if caps[i] > 1]
    heapq.heapify(heap)
    while budget > 0 and heap:
        _, i = heapq.heappop(heap)
        take[i] += 1
        budget -= 1
        if take[i] < caps[i]:
            heapq.heappush(heap, (-lengths[i] / take[i], i))
    if times is not None:
        return [(i, f) for i in sorted(take) for f in _spread_times(times, *shots[i], take[i], min_gap_s)]
    return [(i, f) for i in sorted(take) for f in _spread(shots[i][0], lengths[i], take[i], gap)]


def _spread(start: int, length: int, k: int, gap: int) -> list[int]:
    """K frame indices in [start, start + length), at least GAP apart (needs (k - 1) * gap <= length - 1):
    evenly spaced, inset from the ends by up to half a share of the shot where the gap leaves room."""
    span = length - 1
    if k == 1:
        return [start + span // 2]
    inset = min((span - (k - 1) * gap) // 2, length // (2 * k))
    step = (span - 2 * inset) / (k - 1)  # >= gap, so floor(i * step) steps by >= gap
    return [start + inset + math.floor(i * step) for i in range(k)]


def _greedy(times: list[float], start: int, end: int, gap_s: float, k: int) -> list[int]:
    """Up to K frames of [start, end): the first, then each the next frame at least GAP_S after the one before
    (as many as the shot holds at that spacing: frames of one time count once)."""
    picks = [start] if end > start and k > 0 else []
    while 0 < len(picks) < k:
        n = _next_frame(times, times[picks[-1]] + gap_s, picks[-1] + 1, end)
        if n >= end:
            break
        picks.append(n)
    return picks


def _next_frame(times: list[float], at: float, lo: int, end: int) -> int:
    """The first frame in [lo, end) whose time is at least AT (end: none)."""
    return bisect.bisect_left(times, at - 1e-9, lo, end)


def _spread_times(times: list[float], start: int, end: int, k: int, gap_s: float) -> list[int]:
    """_spread in time: K frames of [start, end) at least GAP_S apart in TIMES (needs _greedy to find K): the
    first frames at or after evenly spaced moments, inset from the cuts, each pushed later where the frame before
    needs its gap; where uneven gaps leave no room for that, the earliest K (_greedy)."""
    t0, t1 = times[start], times[end - 1]
    if k == 1:
        return [min(end - 1, _next_frame(times, (t0 + t1) / 2, start, end))]
    inset = max(0.0, min((t1 - t0 - (k - 1) * gap_s) / 2, (t1 - t0) / (2 * k)))
    step = (t1 - t0 - 2 * inset) / (k - 1)
    picks: list[int] = []
    for i in range(k):
        at = t0 + inset + i * step
        lo = start
        if picks:
            at, lo = max(at, times[picks[-1]] + gap_s), picks[-1] + 1
        n = _next_frame(times, at, lo, end)
        if n >= end:
            return _greedy(times, start, end, gap_s, k)
        picks.append(n)
    return picks


# ------------------------------------------------------------------------------------------------ decoding


class VideoError(Exception):
    """The video cannot be decoded (further). reason: in words that group, for the failure row."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Orientation:
    """What turns a decoded frame upright as players show it: a horizontal flip (MIRROR) first, then ROTATION
    degrees counter-clockwise (0, 90, 180 or 270). The eight orientations of a picture each have one such form: a
    vertical flip is a horizontal one then rotate_180."""

    mirror: bool = False
    rotation: int = 0

    def words(self) -> list[str]:
        """What extra.decode says of it, in the order applied: ["hflip", "rotate_90"]; [] for none."""
        return ["hflip"] * self.mirror + [f"rotate_{self.rotation}"] * bool(self.rotation)


@dataclass
class Scan:
    """What the first pass learnt: each decoded frame's pts (None where the stream gives none) and key-frame flag,
    the shots as [start, end) frame ranges, the (average) frame rate, what turns a decoded frame upright
    (display_orientation), and why decoding stopped early (None: it did not)."""

    pts: list[int | None] = field(default_factory=list)
    keys: list[bool] = field(default_factory=list)
    shots: list[tuple[int, int]] = field(default_factory=list)
    fps: float = 0.0
    time_base: float = 0.0
    start: int = 0
    orientation: Orientation = Orientation()
    broke: str | None = None

    def time(self, n: int) -> float:
        """Frame N's presentation time in seconds from the start of the stream (>= 0)."""
        p = self.pts[n] if n < len(self.pts) else None
        if p is None or not self.time_base:
            return n / self.fps if self.fps else 0.0
        return max(0.0, (p - self.start) * self.time_base)

    def seekable(self) -> bool:
        """Every frame has its own pts: a seek lands on a frame we can name."""
        return all(p is not None for p in self.pts) and len(set(self.pts)) == len(self.pts)

    def vfr_times(self) -> list[float] | None:
        """Each frame's time, when the frame rate varies (a phone's video in low light): some frame lies more than
        a quarter frame from where the average rate puts it. None when the frame count is the clock, or the
        frames carry no increasing pts to tell."""
        if not self.pts or not self.time_base or not self.seekable():
            return None
        t = [self.time(n) for n in range(len(self.pts))]
        if any(b <= a for a, b in zip(t, t[1:])):
            return None
        if all(abs(x - t[0] - n / self.fps) <= 0.25 / self.fps for n, x in enumerate(t)):
            return None
        return t


def _ffmpeg_words(e: BaseException) -> str:
    """An FFmpeg error in stable words: its type and strerror, without the file name or call it names."""
    msg = getattr(e, "strerror", None) or str(e)
    msg = re.sub(r"^\[Errno -?\d+\]\s*", "", str(msg)).split(":", 1)[0].strip()
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def open_video(data: bytes | str):
    """A PyAV container of the video (bytes, or a local path) and its first video stream; VideoError saying why not
    (empty, not a video or cut short before its index, no video stream)."""
    import av

    if isinstance(data, bytes) and not data:
        raise VideoError("not a video: the file is empty")
    try:
        container = av.open(io.BytesIO(data) if isinstance(data, bytes) else data, "r")
    except (av.FFmpegError, ValueError) as e:
        raise VideoError(
            f"not a video, or a video cut short (FFmpeg {_ffmpeg_words(e)}): check the file plays; an MP4 "
            "cut short loses its index (the moov atom) when it is written at the end"
        ) from e
    if not container.streams.video:
        container.close()
        raise VideoError("no video stream in the file (audio or data only)")
    return container, container.streams.video[0]


def scan(container, stream, threshold: float, min_shot_s: float) -> Scan:
    """Pass 1: every frame decoded once at SCAN_WIDTH, streamed through the content detector (nothing kept but
    pts and key flags); decoding that breaks ends the scan with `broke` set and the shots found so far."""
    import av
    from scenedetect import ContentDetector
    from scenedetect.common import FrameTimecode

    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 25.0
    s = Scan(fps=fps, time_base=float(stream.time_base or 0), start=stream.start_time or 0)
    # every frame over the threshold is a cut: the detector counts a shot's length in frames at one rate, so
    # min_shot_s is held after the scan, in the frames' own times (merge_short_shots)
    detector = ContentDetector(threshold=threshold, min_scene_len=0)
    cuts: list[int] = []
    width = height = None
    try:
        for frame in container.decode(stream):
            if width is None:
                width = min(SCAN_WIDTH, frame.width)
                height = max(2, round(frame.height * width / frame.width / 2) * 2)
                # only the stored frames are turned: the detector's frame differences do not depend on it
                s.orientation = display_orientation(frame, stream)
            n = len(s.pts)
            s.pts.append(frame.pts)
            s.keys.append(bool(frame.key_frame))
            # swscale's fast bilinear: a third of the scan's time with its default bicubic, and cuts are coarse
            small = frame.reformat(width, height, "bgr24", interpolation="FAST_BILINEAR").to_ndarray()
            cuts += [tc.frame_num for tc in detector.process_frame(FrameTimecode(n, fps=fps), small)]
    except (av.FFmpegError, ValueError, OSError) as e:
        s.broke = f"decoding broke ({_ffmpeg_words(e)})"
    n = len(s.pts)
    if n:
        cuts += [tc.frame_num for tc in detector.post_process(FrameTimecode(n - 1, fps=fps))]
    if s.broke is None:
        s.broke = _cut_short(container, stream, s)
    times = s.vfr_times() or [i / fps for i in range(n)]  # the clock sample_frames keeps min_gap_s by
    s.shots = merge_short_shots(sorted({c for c in cuts if 0 < c < n}), times, min_shot_s, 1 / fps)
    return s


def merge_short_shots(cuts: list[int], times: list[float], min_shot_s: float, last_s: float) -> list[tuple[int, int]]:
    """The shots, as [start, end) frame ranges, of the len(TIMES) frames cut before each frame of CUTS (sorted, in
    (0, len(times))), each at least MIN_SHOT_S long: a shorter one is merged into the next, the last into the one
    before (one shot when the whole video is shorter). TIMES: each frame's time in seconds, non-decreasing; a shot
    lasts from its first frame's time to the next shot's, the last one to its last frame's time + LAST_S."""
    if not times:
        return []
    kept = [0]
    for c in cuts:
        if times[c] - times[kept[-1]] >= min_shot_s - 1e-9:
            kept.append(c)
    if len(kept) > 1 and times[-1] + last_s - times[kept[-1]] < min_shot_s - 1e-9:
        kept.pop()
    bounds = [*kept, len(times)]
    return list(zip(bounds, bounds[1:]))


def display_orientation(frame, stream) -> Orientation:
    """How players turn FRAME upright: by the display matrix (a phone's portrait video, a selfie camera's mirror)
    that FFmpeg passes from the container to each decoded frame (PyAV shows it as frame side data; it reads no
    stream's), else by the legacy `rotate` tag of the stream (degrees clockwise; no mirror).

    The matrix's 2x2 part [[a, b], [c, d]] maps a stored pixel (x, y), y down, to where it is shown:
    (x', y') = (a x + c y, b x + d y), as FFmpeg's autorotate reads it. A negative determinant is a mirror: taken as
    a horizontal flip first (negating a and b), what is left is a rotation by atan2(b, a) clockwise."""
    from av.sidedata.sidedata import Type

    matrix = frame.side_data.get(Type.DISPLAYMATRIX)
    if matrix is not None:
        a, b, _, c, d, *_ = struct.unpack("=9i", bytes(matrix))  # 16.16 fixed point: only signs and ratios count
        mirror = a * d - b * c < 0
        if mirror:
            a, b = -a, -b
        return Orientation(mirror, _quarter_turns(-math.degrees(math.atan2(b, a))))
    tag = next((v for k, v in stream.metadata.items() if k.lower() == "rotate"), None)  # Matroska: ROTATE
    try:
        return Orientation(False, _quarter_turns(-float(tag or 0)))
    except ValueError:  # a tag that is no number: no rotation
        return Orientation()


def _quarter_turns(ccw: float) -> int:
    """CCW degrees as the nearest of 0, 90, 180, 270 (a matrix's rotation is a multiple of 90 but for rounding)."""
    return round(ccw / 90) % 4 * 90


def upright(pixels, orientation: Orientation):
    """(H, W, 3) PIXELS of a decoded frame turned upright by ORIENTATION (display_orientation): flipped left to
    right, then turned (np.rot90 turns counter-clockwise)."""
    import numpy as np

    if orientation == Orientation():
        return pixels
    return np.ascontiguousarray(np.rot90(pixels[:, ::-1] if orientation.mirror else pixels, orientation.rotation // 90))


def _cut_short(container, stream, s: Scan) -> str | None:
    """Why a scan that ended without an error still lost frames: fewer than the stream's frame count, or (a
    container without one, Matroska) ending more than a second before the container's duration."""
    n = len(s.pts)
    if stream.frames and n < stream.frames:
        return "the video ends early (fewer frames decode than its header counts)"
    if not stream.frames and container.duration and n:
        total = container.duration / 1_000_000
        last = s.time(n - 1) + 1 / s.fps
        if last < total - 1.0:
            return "the video ends early (its frames stop before the duration its header gives)"
    return None


def grab(container, stream, s: Scan, wanted: list[int]):
    """Pass 2: yield (n, (H, W, 3) uint8 RGB) for the frame indices WANTED (sorted), decoding only from the key
    frame before each (a seek) unless the decoder is already there; a frame that cannot be reached yields
    (n, VideoError)."""
    import av

    if not s.seekable():  # frames without their own pts: decode forward from the start, counting
        yield from _grab_forward(container, stream, wanted)
        return
    index = {p: i for i, p in enumerate(s.pts)}
    keys = [0] + [i for i, k in enumerate(s.keys) if k and i]
    frames, cur = None, -1  # the decoder's iterator, and the index of the frame it gave last
    for n in wanted:
        key = keys[bisect.bisect_right(keys, n) - 1]  # the key frame at or before n
        try:
            if frames is None or cur >= n or cur < key - 1:
                container.seek(s.pts[key], stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
            got = None
            for frame in frames:
                cur = index.get(frame.pts, cur + 1)
                if cur >= n:
                    got = frame if cur == n else None
                    break
            if got is None:
                frames = None
                yield n, VideoError("the sampled frame could not be found again after a seek")
            else:
                yield n, got.to_ndarray(format="rgb24")
        except (av.FFmpegError, ValueError, OSError) as e:
            frames = None
            yield n, VideoError(f"the sampled frame does not decode ({_ffmpeg_words(e)})")


def _grab_forward(container, stream, wanted: list[int]):
    """grab for a stream whose frames cannot be named by pts: one decode from the start, counting frames."""
    import av

    todo = iter(wanted)
    nxt = next(todo, None)
    try:
        container.seek(0)
        for n, frame in enumerate(container.decode(stream)):
            if nxt is None:
                return
            if n == nxt:
                yield n, frame.to_ndarray(format="rgb24")
                nxt = next(todo, None)
    except (av.FFmpegError, ValueError, OSError) as e:
        err = f"the sampled frame does not decode ({_ffmpeg_words(e)})"
        while nxt is not None:
            yield nxt, VideoError(err)
            nxt = next(todo, None)


# ------------------------------------------------------------------------------------------------- items


def frame_source(video: str, n: int) -> str:
    """The source (and so, by make_key, the key) of frame N of VIDEO."""
    return f"{video}#frame={n}"


def video_items(
    video: str,
    unit_key: str,
    data: bytes | str,
    alt_text: str | None = None,
    cfg: VideoConfig | None = None,
    decode: DecodeConfig | None = None,
) -> list[Item]:
    """A video's items: one per sampled frame (decoded as decode_item decodes a photo, from its JPEG), in frame
    order, then one failed at "decode" when the video cannot be opened or breaks partway. VIDEO: its source as the
    plan names it; UNIT_KEY: its plan key; DATA: its bytes, or a local path (read in place, not into memory)."""
    cfg = cfg or VideoConfig()
    try:
        container, stream = open_video(data)
    except VideoError as e:
        return [_video_failure(video, unit_key, alt_text, e.reason, 0, 0, 0.0)]
    with container:
        s = scan(container, stream, cfg.shot_threshold, cfg.min_shot_s)
        picks = sample_frames(s.shots, s.fps, cfg.frames_per_shot, cfg.min_gap_s, cfg.max_frames, times=s.vfr_times())
        shot_of = {n: shot for shot, n in picks}
        items = [
            _frame_item(video, unit_key, alt_text, s, shot_of[n], n, got, decode)
            for n, got in grab(container, stream, s, [n for _, n in picks])
        ]
    if s.broke is not None:
        kept = "; the frames sampled before it are kept" if items else ""
        reason = f"video truncated or corrupt: {s.broke}{kept}"
        items.append(
            _video_failure(video, unit_key, alt_text, reason, max(0, len(s.shots) - 1), len(s.pts), s.time(len(s.pts)))
        )
    elif not items:
        items.append(_video_failure(video, unit_key, alt_text, "the video has no frames", 0, 0, 0.0))
    return items


def _video_failure(video: str, unit_key: str, alt: str | None, reason: str, shot: int, frame: int, t: float) -> Item:
    """The item of a video that does not decode (any further): keyed by its plan key, its VideoFrame where it
    stopped."""
    item = {"key": unit_key, "source": video, "image_bytes": b"", "alt_text": alt, "unit_key": unit_key}
    item["video"] = {"source": video, "shot": shot, "frame": frame, "time": t}
    return fail(item, "decode", reason)


def _frame_item(
    video: str, unit_key: str, alt: str | None, s: Scan, shot: int, n: int, got, decode: DecodeConfig | None
) -> Item:
    source = frame_source(video, n)
    if isinstance(got, VideoError):
        item = fail(
            {"key": make_key(source), "source": source, "image_bytes": b"", "alt_text": alt}, "decode", got.reason
        )
    else:
        buf = io.BytesIO()
        Image.fromarray(upright(got, s.orientation)).save(buf, "JPEG", quality=FRAME_QUALITY)
        item = decode_item(source, buf.getvalue(), alt_text=alt, key=make_key(source), cfg=decode)
        if s.orientation.words() and not item.get("failure"):  # said as a photo's EXIF transpose is (records.md)
            item.setdefault("extra", {}).setdefault("decode", [])[:0] = s.orientation.words()
    item["video"] = {"source": video, "shot": shot, "frame": n, "time": s.time(n)}
    item["unit_key"] = unit_key
    return item
