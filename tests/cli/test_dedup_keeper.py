"""`vlmfast dedup` keeps the lossless original over its lossy re-save (issue 19, item 9), says its
keeper rule in the report, names unreadable files with reasons, and words errors by its flags."""

import json

from PIL import Image

from vlmfast.cli import main
from vlmfast.data.dedup import KEEP_RULE
from vlmfast.data.synthetic import SyntheticShapes


def _picture(index: int, size=(96, 96)) -> Image.Image:
    """A built-in shapes image: flat colours, which PNG stores in fewer bytes than a JPEG does."""
    return Image.fromarray(SyntheticShapes(3, seed=3, image_size=96)[index].image).resize(size)


def test_the_lossless_original_is_kept_over_a_larger_jpeg_resave(tmp_path, capsys):
    _picture(0).save(tmp_path / "b-original.png")
    _picture(0).save(tmp_path / "a-resave.jpg", quality=100, subsampling=0)
    _picture(1).save(tmp_path / "c-original.png")
    _picture(1).convert("P").save(tmp_path / "d-palette.gif")
    _picture(1).save(tmp_path / "e-resave.jpg", quality=100)
    # the JPEGs are the larger files: the old rule (most pixels, then the larger file) kept them
    assert (tmp_path / "a-resave.jpg").stat().st_size > (tmp_path / "b-original.png").stat().st_size
    (tmp_path / "broken.png").write_bytes(b"\x89PNG nothing")
    assert main(["dedup", str(tmp_path), "--max-distance", "6"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert [group[0] for group in report["groups"]] == ["b-original.png", "c-original.png"]
    assert sorted(report["groups"][1]) == ["c-original.png", "d-palette.gif", "e-resave.jpg"]
    assert report["groups"][1][1:] == ["d-palette.gif", "e-resave.jpg"]  # a palette beats lossy
    assert report["keep_rule"] == KEEP_RULE
    assert report["unreadable"] == [{"path": "broken.png", "reason": "not an image file Pillow can read"}]
    assert f"skipped {tmp_path / 'broken.png'}: not an image file Pillow can read" in captured.err


def test_more_pixels_still_come_first(tmp_path, capsys):
    _picture(2, size=(48, 48)).save(tmp_path / "small.png")
    _picture(2, size=(192, 192)).save(tmp_path / "large.jpg", quality=90)
    assert main(["dedup", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["groups"] == [["large.jpg", "small.png"]]


def test_errors_name_the_command_line_not_the_function(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no images here")
    assert main(["dedup", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "FOLDER: no image files" in err and "path:" not in err
    assert main(["dedup", str(tmp_path), "--max-distance", "-1"]) == 2
    err = capsys.readouterr().err
    assert "argument --max-distance: expected an integer from 0 to 64 bits, got -1" in err and "max_distance:" not in err
