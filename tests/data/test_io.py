from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from updetr.data.io import (
    IMAGE_EXTENSIONS, DataError, is_image_file, load_annotated_image, load_image, parse_box, parse_image_box,
)


def _save(tmp_path, image, name, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def _rgb(image):
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_rgb_roundtrip(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    path = _save(tmp_path, Image.fromarray(pixels), "a.png")
    image = load_image(path)
    assert image.size == (20, 12)
    np.testing.assert_array_equal(np.asarray(image), pixels)


def _exif_jpeg(tmp_path, orientation):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # (H, W) = (20, 40), left half red
    pixels[:, :20, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(tmp_path, Image.fromarray(pixels), "exif.jpg", exif=exif.tobytes(), quality=95)


def test_exif_orientation_applied(tmp_path):
    path = _exif_jpeg(tmp_path, 6)  # 6: display rotated 90 degrees clockwise
    image = _rgb(load_image(path))
    assert image.shape[:2] == (40, 20)  # height and width swapped
    assert image[:18, :, 0].mean() > 200 and image[22:, :, 0].mean() < 50  # left half went to the top
    raw = load_image(path, exif_transpose=False)
    assert raw.size == (40, 20)


def test_load_annotated_image_picks_the_annotated_grid(tmp_path):
    path = _exif_jpeg(tmp_path, 6)
    assert load_annotated_image(path, (20, 40)).size == (40, 20)  # raw grid (COCO convention)
    assert load_annotated_image(path, (40, 20)).size == (20, 40)  # EXIF-rotated grid
    with pytest.raises(DataError, match="exif.jpg.*annotation says 30x30"):
        load_annotated_image(path, (30, 30))


def test_grayscale_and_bilevel(tmp_path):
    image = _rgb(load_image(_save(tmp_path, Image.new("L", (5, 4), 100), "l.png")))
    assert image.shape == (4, 5, 3) and (image == 100).all()
    image = _rgb(load_image(_save(tmp_path, Image.new("1", (5, 4), 1), "b.png")))
    assert (image == 255).all()


def test_alpha_modes_composite_over_white(tmp_path):
    la = Image.new("LA", (4, 2), (50, 255))
    la.putpixel((0, 0), (50, 0))  # fully transparent
    image = _rgb(load_image(_save(tmp_path, la, "la.png")))
    assert (image[0, 0] == 255).all() and (image[1, 1] == 50).all()

    rgba = Image.new("RGBA", (4, 2), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black over white -> mid grey
    image = _rgb(load_image(_save(tmp_path, rgba, "rgba.png")))
    assert image[1, 1].tolist() == [10, 20, 30]
    assert image[0, 0].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 2 for v in image[0, 1])


def test_palette_modes(tmp_path):
    palette = [0, 0, 0, 200, 10, 20] + [0] * (256 * 3 - 6)
    p = Image.new("P", (3, 3), 1)
    p.putpalette(palette)
    p.putpixel((0, 0), 0)
    image = _rgb(load_image(_save(tmp_path, p, "p.png")))
    assert image[1, 1].tolist() == [200, 10, 20] and image[0, 0].tolist() == [0, 0, 0]

    p_transparent = p.copy()
    p_transparent.info["transparency"] = 0
    image = _rgb(load_image(_save(tmp_path, p_transparent, "pt.png", transparency=0)))
    assert image[0, 0].tolist() == [255, 255, 255] and image[1, 1].tolist() == [200, 10, 20]

    from updetr.data.io import _to_rgb  # PNG cannot store PA; test the conversion directly

    pa = Image.new("PA", (2, 2))
    pa.putpalette(palette)
    pa.putpixel((0, 0), (1, 255))
    pa.putpixel((1, 0), (1, 0))
    image = _rgb(_to_rgb(pa))
    assert image[0, 0].tolist() == [200, 10, 20] and image[0, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize("ext", ["jpg", "tif"])
def test_cmyk(tmp_path, ext):
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # pure cyan
    image = _rgb(load_image(_save(tmp_path, cmyk, f"c.{ext}")))
    assert image[..., 0].max() < 20 and image[..., 1].min() > 235 and image[..., 2].min() > 235


def test_16_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    path = _save(tmp_path, Image.fromarray(values), "g16.png")
    assert Image.open(path).mode == "I;16"
    image = _rgb(load_image(path))
    assert image[0, :, 0].tolist() == [0, 4, 128, 255]
    assert (image[..., 0] == image[..., 2]).all()

    path = _save(tmp_path, Image.fromarray(values.astype(np.int32), mode="I"), "g32.tif")
    assert Image.open(path).mode == "I"
    assert _rgb(load_image(path))[0, :, 1].tolist() == [0, 4, 128, 255]


def test_truncated_jpeg_names_the_file(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = _save(tmp_path, Image.fromarray(noise), "broken.jpg", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="broken.jpg.*truncated"):
        load_image(path)


def test_missing_and_non_image_files(tmp_path):
    with pytest.raises(DataError, match="nope.jpg: image file not found"):
        load_image(tmp_path / "nope.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("hello, not an image")
    with pytest.raises(DataError, match="notes.jpg: not an image"):
        load_image(text)
    with pytest.raises(DataError, match="directory"):
        load_image(tmp_path)
    assert issubclass(DataError, ValueError)


def test_extensions():
    assert ".jpg" in IMAGE_EXTENSIONS and ".png" in IMAGE_EXTENSIONS
    assert is_image_file("a/B.JPEG") and not is_image_file("a/b.txt")


def test_pixel_limit_is_one_limit_checked_from_the_header(tmp_path, monkeypatch):
    """Pillow only warns between its limit and twice that; updetr refuses everything above it, undecoded."""
    from updetr.data.io import find_unusable_images, image_size_from_bytes

    path = _save(tmp_path, Image.new("RGB", (40, 40)), "forty.png")  # 1600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="forty.png: image of 40x40 pixels is larger than the limit of 1000 pixels"):
        load_image(path)
    with pytest.raises(DataError, match="larger than the limit of 1000 pixels"):
        image_size_from_bytes(path, path.read_bytes())
    assert find_unusable_images([(path, None)])[0].startswith(str(path))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the user turned the limit off
    assert load_image(path).size == (40, 40)


def test_find_unusable_images_reports_every_bad_file(tmp_path):
    from updetr.data.io import find_unusable_images

    good = _save(tmp_path, Image.new("RGB", (8, 6)), "good.png")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    cut = _save(tmp_path, Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                "cut.jpg", quality=95)
    cut.write_bytes(cut.read_bytes()[:300])
    items = [(good, (6, 8)), (text, None), (tmp_path / "absent.png", None), (cut, None), (good, (8, 6))]
    problems = find_unusable_images(items, workers=2)
    assert [p.split(":")[0].rsplit("/", 1)[-1] for p in problems] == ["text.jpg", "absent.png", "cut.jpg", "good.png"]
    assert "annotation says 8x6" in problems[-1]


def test_one_parser_for_img_and_box():
    assert parse_image_box("a/b.jpg") == (Path("a/b.jpg"), None)
    assert parse_image_box("a/b.jpg:1,2,30,40.5") == (Path("a/b.jpg"), (1.0, 2.0, 30.0, 40.5))
    assert parse_image_box("C:/x/b.jpg") == (Path("C:/x/b.jpg"), None)  # a drive letter is not a box
    assert parse_image_box("C:/x/b.jpg:0,0,8,8") == (Path("C:/x/b.jpg"), (0.0, 0.0, 8.0, 8.0))
    assert parse_image_box("odd:name.png") == (Path("odd:name.png"), None)
    with pytest.raises(DataError, match=r"--exemplar 'a.jpg:1,2,3': must be 4 numbers x,y,w,h in pixels, got 3"):
        parse_image_box("a.jpg:1,2,3")
    assert parse_box(" 1, 2,3 ,4") == (1.0, 2.0, 3.0, 4.0)
    with pytest.raises(DataError, match=r"--box '1,2,w,4': must be x,y,w,h in pixels"):
        parse_box("1,2,w,4", "--box")

