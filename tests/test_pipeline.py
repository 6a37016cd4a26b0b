"""The image pipeline: correct display of every photometric and VOI case, every compressed
syntax, and exactly one cloud event per stored instance, off the association's path."""

from __future__ import annotations

import base64
import datetime
import io
import json
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset

from appliance.pipeline.render import RenderError, Rendition, render
from appliance.state import StatePaths
from appliance.testing import synthetic
from appliance.worklist.store import WorklistItem, WorklistStore
from tests.support import ApplianceProcess, encode, send_files, write_config

SHAPE = (256, 208)
SMALL = [Rendition(64, 95)]


def image(**changes) -> Dataset:
    ds = synthetic.mammogram(shape=SHAPE)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def rendered(ds: Dataset, tmp_path: Path, name: str = "x.dcm") -> np.ndarray:
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    [jpeg] = render(path, SMALL)
    picture = Image.open(io.BytesIO(jpeg))
    assert picture.height == 64
    return np.asarray(picture, dtype=np.float32)


def background(pixels: np.ndarray) -> float:
    return float(pixels[:, :6].mean())  # left-breast images: the left edge is air


def tissue(pixels: np.ndarray) -> float:
    return float(pixels[24:40, -12:].mean())  # next to the chest wall


def test_monochrome2_shows_air_dark_and_tissue_bright(tmp_path):
    pixels = rendered(image(), tmp_path)
    assert background(pixels) < 20
    assert tissue(pixels) > 120


def test_monochrome1_is_inverted(tmp_path):
    pixels = rendered(image(PhotometricInterpretation="MONOCHROME1"), tmp_path)
    assert background(pixels) > 235
    assert tissue(pixels) < 135


def test_presentation_lut_inverse_inverts(tmp_path):
    pixels = rendered(image(PresentationLUTShape="INVERSE"), tmp_path)
    assert background(pixels) > 235


def test_window_is_applied_and_the_first_of_several_is_used(tmp_path):
    # A narrow window on the air's value: air mid-grey, all tissue white.
    narrow = rendered(image(WindowCenter=40, WindowWidth=20), tmp_path, "a.dcm")
    assert 100 < background(narrow) < 160
    assert tissue(narrow) > 250
    several = rendered(image(WindowCenter=[40, 2048], WindowWidth=[20, 4096]), tmp_path, "b.dcm")
    assert abs(background(several) - background(narrow)) < 3


def test_sigmoid_voi_function(tmp_path):
    linear = rendered(image(WindowCenter=1500, WindowWidth=3000), tmp_path, "a.dcm")
    sigmoid = rendered(
        image(WindowCenter=1500, WindowWidth=3000, VOILUTFunction="SIGMOID"), tmp_path, "b.dcm"
    )
    # The sigmoid never reaches black: air at 40 is 1/(1+e^(4*1460/3000)) ~ 12% grey.
    assert background(linear) < 20
    assert 20 < background(sigmoid) < 45


def test_voi_lut_sequence_when_no_window_is_given(tmp_path):
    ds = image()
    del ds.WindowCenter, ds.WindowWidth
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 8]
    lut.add_new(0x00283006, "US", [255 - (v >> 4) for v in range(4096)])  # an inverting LUT
    ds.VOILUTSequence = [lut]
    pixels = rendered(ds, tmp_path)
    assert background(pixels) > 235
    assert tissue(pixels) < 120


def test_rescale_slope_and_intercept_come_before_the_window(tmp_path):
    ds = image(RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=-920, WindowWidth=20)
    pixels = rendered(ds, tmp_path)  # air: 40 * 2 - 1000 = -920, the window's centre
    assert 100 < background(pixels) < 160


def test_eight_bit_and_signed_pixels(tmp_path):
    eight = image(BitsAllocated=8, BitsStored=8, HighBit=7, WindowCenter=128, WindowWidth=256)
    halves = np.zeros(SHAPE, dtype=np.uint8)
    halves[:, SHAPE[1] // 2 :] = 255
    eight.PixelData = halves.tobytes()
    pixels = rendered(eight, tmp_path, "eight.dcm")
    assert pixels[:, :20].mean() < 10
    assert pixels[:, -20:].mean() > 245

    signed = image(PixelRepresentation=1, WindowCenter=0, WindowWidth=2000)
    values = np.full(SHAPE, -1000, dtype=np.int16)
    values[:, SHAPE[1] // 2 :] = 1000
    signed.PixelData = values.tobytes()
    pixels = rendered(signed, tmp_path, "signed.dcm")
    assert pixels[:, :20].mean() < 10
    assert pixels[:, -20:].mean() > 245


@pytest.mark.usefixtures("dcmtk")
@pytest.mark.parametrize(
    "syntax",
    [
        pydicom.uid.JPEG2000Lossless,
        pydicom.uid.JPEGLosslessSV1,
        pydicom.uid.JPEGLSLossless,
        pydicom.uid.RLELossless,
    ],
)
def test_compressed_syntaxes_render_like_the_uncompressed_image(tmp_path, syntax):
    plain = tmp_path / "plain.dcm"
    synthetic.mammogram(shape=(1024, 832)).save_as(plain, enforce_file_format=True)
    compressed = encode(plain, tmp_path / "compressed.dcm", syntax)
    assert pydicom.dcmread(compressed).file_meta.TransferSyntaxUID == syntax
    [expected] = render(plain, SMALL)
    [actual] = render(compressed, SMALL)
    difference = np.abs(
        np.asarray(Image.open(io.BytesIO(expected)), dtype=np.float32)
        - np.asarray(Image.open(io.BytesIO(actual)), dtype=np.float32)
    )
    # JPEG 2000 is decoded at reduced resolution (wavelet low-pass, not a box average).
    assert difference.mean() < 4.0


def test_multiframe_shows_the_central_frame(tmp_path):
    ds = synthetic.mammogram(shape=SHAPE, frames=5)
    frames = np.stack([np.full(SHAPE, 400 * (n + 1), dtype=np.uint16) for n in range(5)])
    ds.PixelData = frames.tobytes()
    ds.WindowCenter, ds.WindowWidth = 1200, 400  # frames 0-1 black, 3-4 white, 2 mid-grey
    pixels = rendered(ds, tmp_path)
    assert 100 < pixels.mean() < 160


def test_corrupt_pixel_stream_is_a_decode_error(tmp_path):
    path = tmp_path / "corrupt.dcm"
    plain = tmp_path / "plain.dcm"
    synthetic.mammogram(shape=SHAPE).save_as(plain, enforce_file_format=True)
    ds = pydicom.dcmread(encode(plain, tmp_path / "j2k.dcm", pydicom.uid.JPEG2000Lossless))
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 200])
    ds.save_as(path)
    with pytest.raises(RenderError, match=r"^decode: "):
        render(path, SMALL)


def test_object_without_pixel_data_renders_nothing(tmp_path):
    ds = image()
    del ds.Rows, ds.Columns, ds.PixelData
    path = tmp_path / "no-pixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert render(path, SMALL) is None


# --- through the running appliance ----------------------------------------------------------


def pacs_events(state: Path) -> list[dict]:
    with sqlite3.connect(f"file:{state / 'pacs.db'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM events ORDER BY seq")]


def wait_for_events(state: Path, count: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = pacs_events(state) if (state / "pacs.db").exists() else []
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"{len(found)} of {count} events after {timeout} s"
        time.sleep(0.05)


@pytest.mark.system
@pytest.mark.usefixtures("dcmtk")
def test_stored_images_become_one_image_received_event_each(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    worklist = WorklistStore(StatePaths(state))
    worklist.open()
    worklist.create(
        WorklistItem("ACC-P1", "9990000201", "PIPE^LINE", synthetic_time(), source_message_id="m-7")
    )
    worklist.close()
    paths = synthetic.screening_study(
        tmp_path / "study", shape=(512, 416), accession_number="ACC-P1"
    )
    with ApplianceProcess(write_config(tmp_path)) as app:
        assert [r.Status for r in send_files(app.ports["storage"], paths)] == [0, 0, 0, 0]
        events = wait_for_events(state, 4)
        send_files(app.ports["storage"], paths[:1])  # a duplicate is not news
        time.sleep(0.5)
        assert len(pacs_events(state)) == 4
    views = set()
    for event in events:
        assert event["event_type"] == "image.received"
        assert event["source_message_id"] == "m-7"
        payload = json.loads(event["payload"])
        views.add((payload["laterality"], payload["view_position"]))
        thumbnail = Image.open(io.BytesIO(base64.b64decode(payload["thumbnail"])))
        assert (thumbnail.format, thumbnail.height) == ("JPEG", 188)
        assert len(payload["sha256"]) == 64
        assert payload["accession_number"] == "ACC-P1"
    assert views == {("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")}
    previews = list((state / "derived").rglob("*.preview.jpg"))
    assert len(previews) == 4
    with Image.open(previews[0]) as preview:
        assert preview.height == 1024


def synthetic_time() -> datetime.datetime:
    return datetime.datetime(2026, 11, 22, 10, tzinfo=datetime.UTC)


@pytest.mark.system
@pytest.mark.usefixtures("dcmtk")
def test_corrupt_image_is_reported_failed_at_once_and_service_goes_on(tmp_path):
    """Pixel data that does not decode will not decode on another try: reported at the first
    attempt (retries are for what can change: a lost worker, the machine's trouble)."""
    plain = tmp_path / "plain.dcm"
    synthetic.mammogram(shape=SHAPE).save_as(plain, enforce_file_format=True)
    corrupt = pydicom.dcmread(encode(plain, tmp_path / "j2k.dcm", pydicom.uid.JPEG2000Lossless))
    corrupt.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 200])
    corrupt.save_as(tmp_path / "corrupt.dcm")
    good = tmp_path / "good.dcm"
    synthetic.mammogram(shape=SHAPE).save_as(good, enforce_file_format=True)
    override = {"pipeline": {"max_attempts": 2, "retry_after_s": 0.5}}
    with ApplianceProcess(write_config(tmp_path, override)) as app:
        assert send_files(app.ports["storage"], [tmp_path / "corrupt.dcm"])[0].Status == 0
        [failed] = wait_for_events(tmp_path / "state", 1, timeout=30)
        assert send_files(app.ports["storage"], [good])[0].Status == 0
        events = wait_for_events(tmp_path / "state", 2)
        log = app.log()
    assert failed["event_type"] == "image.failed"
    payload = json.loads(failed["payload"])
    assert (payload["phase"], payload["attempts"]) == ("decode", 1)
    assert events[1]["event_type"] == "image.received"
    assert log.count("event=image.failed") == 1
    assert "event=service.crashed" not in log


@pytest.mark.system
@pytest.mark.usefixtures("dcmtk")
def test_restart_mid_batch_processes_every_instance_exactly_once(tmp_path):
    paths = []
    for n in range(6):  # enough work that the kill lands mid-batch even on a slow run
        paths += synthetic.screening_study(tmp_path / f"s{n}", shape=(2048, 1664))
    config = write_config(tmp_path, {"pipeline": {"workers": 1}})
    state = tmp_path / "state"
    app = ApplianceProcess(config)
    with app:
        assert all(r.Status == 0 for r in send_files(app.ports["storage"], paths))
        wait_for_events(state, 1)
        app.stop(signal.SIGKILL)
    done_before = len(pacs_events(state))
    assert done_before < len(paths), "the batch finished before the kill; nothing was tested"
    with ApplianceProcess(config):
        events = wait_for_events(state, len(paths))
        time.sleep(0.5)
        events = pacs_events(state)
    uids = [json.loads(e["payload"])["sop_instance_uid"] for e in events]
    assert sorted(uids) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in paths)
    assert len(set(e["event_id"] for e in events)) == len(paths)
