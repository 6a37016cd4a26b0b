"""Thumbnails and previews of vendor-style mammograms, encoded by dcmtk and OpenJPEG, against
dcmtk's rendering or PS3.3 C.11 (tests/render_corpus.py): within 3 grey levels on average, with
the same polarity. A contact sheet of every case (ours | reference) is left in the test's
temporary directory for a person to look at."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw

from appliance.pipeline.render import RenderError, Rendition, render
from appliance.pipeline.workers import prove_and_render_job
from tests import render_corpus
from tests.render_corpus import CASES, Case

pytestmark = pytest.mark.skipif(
    not (shutil.which("dcm2pnm") and shutil.which("opj_compress")),
    reason="dcmtk and libopenjp2-tools are installed by `just deps`",
)

RENDITIONS = [Rendition(188, 95), Rendition(512, 95)]
MAX_MEAN_DIFFERENCE = 3.0


def _scaled(grey: np.ndarray, height: int) -> np.ndarray:
    image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))
    width = round(image.width * height / image.height)
    return np.asarray(image.resize((width, height), Image.Resampling.BOX), dtype=np.float64)


def _decoded(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as image:
        return np.asarray(image.convert("L"), dtype=np.float64)


def _tissue_brighter_than_background(grey: np.ndarray) -> bool:
    rows, columns = grey.shape
    background = grey[: rows // 10, -columns // 10 :].mean()  # far from the chest wall
    breast = grey[rows * 2 // 5 : rows * 3 // 5, : columns // 4].mean()
    return bool(breast > background + 40)


class ContactSheet:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[tuple[str, np.ndarray, np.ndarray, float]] = []

    def add(self, name: str, ours: np.ndarray, theirs: np.ndarray, difference: float) -> None:
        self.rows.append((name, ours, theirs, difference))
        self.save()

    def save(self) -> None:
        height = 188 + 16
        width = max(o.shape[1] + t.shape[1] for _, o, t, _ in self.rows) + 24
        sheet = Image.new("L", (width, height * len(self.rows)), 128)
        draw = ImageDraw.Draw(sheet)
        for index, (name, ours, theirs, difference) in enumerate(self.rows):
            top = index * height
            sheet.paste(Image.fromarray(ours.astype(np.uint8)), (4, top + 14))
            sheet.paste(Image.fromarray(theirs.astype(np.uint8)), (ours.shape[1] + 12, top + 14))
            draw.text((4, top + 1), f"{name}: ours | reference, mean |diff| {difference:.2f}", 255)
        sheet.save(self.path)


@pytest.fixture(scope="module")
def sheet(tmp_path_factory: pytest.TempPathFactory) -> ContactSheet:
    return ContactSheet(tmp_path_factory.mktemp("contact-sheet") / "contact-sheet.png")


def _compare(name: str, jpegs: list[bytes], expected: np.ndarray, sheet: ContactSheet) -> None:
    for jpeg, rendition in zip(jpegs, RENDITIONS, strict=True):
        ours = _decoded(jpeg)
        theirs = _scaled(expected, rendition.height)
        assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
        difference = float(np.abs(ours - theirs).mean())
        if rendition.height == RENDITIONS[0].height:
            sheet.add(name, ours, theirs, difference)
        assert _tissue_brighter_than_background(theirs), f"{name}: the reference is a negative"
        assert _tissue_brighter_than_background(ours), f"{name}: our rendering is a negative"
        assert difference <= MAX_MEAN_DIFFERENCE, (
            f"{name} at {rendition.height} px: mean difference {difference:.2f} grey levels "
            f"(contact sheet: {sheet.path})"
        )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rendering_matches_the_reference(case: Case, tmp_path: Path, sheet: ContactSheet) -> None:
    path, ds = render_corpus.make(case, tmp_path)
    expected = render_corpus.reference(case, path, ds, tmp_path)
    jpegs = render(path, RENDITIONS)
    assert jpegs is not None
    _compare(case.name, jpegs, expected, sheet)
    # The pipeline's first pass renders from the frame its proof decoded: the same picture.
    proof, first_pass, error, _peak = prove_and_render_job(str(path), RENDITIONS, True)
    assert (proof, error) == ("", None)
    for ours, again in zip(jpegs, first_pass, strict=True):
        assert float(np.abs(_decoded(ours) - _decoded(again)).mean()) < 1.0


def test_tomosynthesis_uses_the_frame_voi_lut_of_its_functional_groups(
    tmp_path: Path, sheet: ContactSheet
) -> None:
    ds = render_corpus.tomosynthesis(frames=5)
    path = render_corpus.save(ds, tmp_path / "dbt.dcm")
    central = ds.pixel_array[2].astype(np.float64)
    frame = pydicom.Dataset()
    frame.WindowCenter, frame.WindowWidth = 350, 400  # the central frame's own Frame VOI LUT
    expected = render_corpus.c11_rendering(central, ds, frame)
    jpegs = render(path, RENDITIONS)
    assert jpegs is not None
    _compare("dbt-per-frame-voi", jpegs, expected, sheet)


def test_tomosynthesis_shared_frame_voi_lut_applies_to_every_frame(
    tmp_path: Path, sheet: ContactSheet
) -> None:
    ds = render_corpus.tomosynthesis(frames=5)
    for group in ds.PerFrameFunctionalGroupsSequence:
        del group.FrameVOILUTSequence
    shared = pydicom.Dataset()
    shared.WindowCenter, shared.WindowWidth, shared.VOILUTFunction = 300, 350, "SIGMOID"
    ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence = [shared]
    path = render_corpus.save(ds, tmp_path / "dbt-shared.dcm")
    expected = render_corpus.c11_rendering(ds.pixel_array[2].astype(np.float64), ds, shared)
    jpegs = render(path, RENDITIONS)
    assert jpegs is not None
    _compare("dbt-shared-sigmoid-voi", jpegs, expected, sheet)


def test_tomosynthesis_frame_voi_lut_given_as_a_table(tmp_path: Path, sheet: ContactSheet) -> None:
    """The tomosynthesis IOD's Frame VOI LUT With LUT macro: a table instead of a window."""
    ds = render_corpus.tomosynthesis(frames=5)
    entries = 1024
    lut = pydicom.Dataset()
    lut.LUTDescriptor = [entries, 0, 12]
    ramp = np.clip(np.linspace(-0.3, 1.6, entries), 0.0, 1.0) ** 0.6
    lut.add_new(0x00283006, "US", [int(v) for v in np.rint(ramp * 4095)])
    for group in ds.PerFrameFunctionalGroupsSequence:
        item = pydicom.Dataset()
        item.VOILUTSequence = [lut]
        group.FrameVOILUTSequence = [item]
    path = render_corpus.save(ds, tmp_path / "dbt-table.dcm")
    reference = pydicom.Dataset()
    reference.PhotometricInterpretation = "MONOCHROME2"
    reference.VOILUTSequence = [lut]
    expected = render_corpus.c11_rendering(ds.pixel_array[2].astype(np.float64), reference)
    jpegs = render(path, RENDITIONS)
    assert jpegs is not None
    _compare("dbt-voi-table", jpegs, expected, sheet)


@pytest.mark.parametrize(
    ("center", "width", "colour"),
    [
        (60000, 10, "black"),  # far above every stored value
        (20000, 36000, "black"),  # the data in the window's darkest 5%: a mis-scaled decode
        (-5000, 10, "white"),
    ],
)
def test_a_uniform_rendering_of_varying_pixels_is_a_render_failure(
    tmp_path: Path, center: int, width: int, colour: str
) -> None:
    ds = render_corpus.vendor_image()
    ds.WindowCenter, ds.WindowWidth = center, width
    path = render_corpus.save(ds, tmp_path / "uniform.dcm")
    with pytest.raises(RenderError) as failure:
        render(path, RENDITIONS)
    assert failure.value.phase == "render"
    assert failure.value.final  # trying again cannot change it: no retries
    assert colour in str(failure.value)


@pytest.mark.parametrize("marked", [0.0, 0.003])
def test_a_flat_image_is_not_refused_even_with_a_few_marks(tmp_path: Path, marked: float) -> None:
    """A flat field (a test exposure) or one with a small specimen or a text overlay is an
    image: its histogram has no spread between the 1st and 99th percentiles."""
    ds = render_corpus.vendor_image()
    pixels = np.full((ds.Rows, ds.Columns), 80, dtype=np.uint16)
    pixels.ravel()[: int(pixels.size * marked)] = 3000
    ds.PixelData = pixels.tobytes()
    path = render_corpus.save(ds, tmp_path / "flat.dcm")
    assert render(path, RENDITIONS) is not None
