"""Video in: frame sampling, prompts for every family, and bad videos."""

from pathlib import Path

import pytest

import nanovl
from nanovl.api import VisionLanguageModel
from nanovl.cli import main
from nanovl.errors import RequestError
from nanovl.media import MediaError, load_video

COUNTER = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "pyscenedetect" / "counter.mp4"


@pytest.fixture(scope="module")
def counter(tmp_path_factory):
    """The corpus clip (10 fps, 30 frames, 3 s) when present, else one like it made with PyAV."""
    if COUNTER.is_file():
        return COUNTER
    return write_clip(tmp_path_factory.mktemp("video") / "counter.mp4", 30)


def write_clip(path, n, fps=10):
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            img = np.full((48, 64, 3), (i * 8) % 256, dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())
    return path


def test_fps_sampling_returns_the_requested_times(counter):
    v = load_video(counter, fps=2)
    assert v.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert len(v.frames) == 6 and v.frames[0].mode == "RGB"
    v = load_video(counter, fps=10)
    assert v.timestamps == pytest.approx([i / 10 for i in range(30)])
    assert len(load_video(counter, fps=100).frames) == 30  # never more often than the video has frames


def test_uniform_sampling_spans_the_clip(counter):
    v = load_video(counter, frames=5)
    want = [2.9 * i / 4 for i in range(5)]  # first to last frame
    assert all(abs(t - w) <= 0.05 + 1e-9 for t, w in zip(v.timestamps, want))
    assert v.timestamps[0] == 0.0 and v.timestamps[-1] == pytest.approx(2.9)
    assert len(load_video(counter).frames) == 8


def test_bad_videos(tmp_path, counter):
    (tmp_path / "notes.mp4").write_text("this is not a video")
    with pytest.raises(MediaError, match="not a video PyAV can read"):
        load_video(tmp_path / "notes.mp4")
    data = Path(counter).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 20])
    with pytest.raises(MediaError, match="cut.mp4"):
        load_video(tmp_path / "cut.mp4")
    # a valid container whose frames are all zero bytes: nothing decodes
    data = bytearray(write_clip(tmp_path / "clip.mp4", 10).read_bytes())
    start, end = data.find(b"mdat") + 4, data.find(b"moov")
    data[start : end - 8] = bytes(end - 8 - start)
    (tmp_path / "blank.mp4").write_bytes(bytes(data))
    with pytest.raises(MediaError, match="blank.mp4: (corrupt video|no decodable frames)"):
        load_video(tmp_path / "blank.mp4")
    with pytest.raises(MediaError, match="--frames"):
        load_video(counter, frames=0)


@pytest.mark.parametrize("family", ["v1", "nvlm", "v2"])
def test_ask_about_a_video_every_family(family, tiny_v1, tiny_nvlm, tiny_v2, counter, capsys):
    path = {"v1": tiny_v1, "nvlm": tiny_nvlm, "v2": tiny_v2}[family]
    assert main(["ask", "--model", str(path), str(counter), "Which number?", "--fps", "2", "--max-tokens", "3"]) == 0
    m = nanovl.load(path, dtype="float32")
    assert isinstance(m, VisionLanguageModel)
    prompt = m.prepare(m.load_images(counter, fps=2), "Which number?")
    assert len(prompt.plans) == 6 and all(p.tiles == 1 for p in prompt.plans)
    text = m.tokenizer.decode(prompt.ids)
    assert "Frame 1 sampled at 0.00 seconds: " in text and "Frame 6 sampled at 2.50 seconds: " in text


def test_more_frames_than_fit_the_context(tiny_v1, counter):
    m = nanovl.load(tiny_v1, dtype="float32")
    clip = m.load_images(counter, fps=10)  # 30 frames x 256 = 7,680 tokens, twice: over 16,384
    with pytest.raises(RequestError, match=r"60 video frame\(s\) take 15360 tokens.*over the context of 16384"):
        m.prepare(clip * 2, "Q", reserve=1200)
