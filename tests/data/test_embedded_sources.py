"""The bundled material of the embedded benchmark (``updetr.data.embedded_sources``): the thing classes, and
every picture loads offline."""

import numpy as np
import pytest
import skimage.data

from updetr.data import embedded_sources as S
from updetr.data.embedded_sources import EMBEDDED_STUFF_CLASSES, EMBEDDED_THING_CLASSES, THING_SOURCES, bundled_picture

NUM_THINGS = len(EMBEDDED_THING_CLASSES)


def test_thing_classes_are_the_photographed_objects_in_source_order():
    assert len(THING_SOURCES) == NUM_THINGS == 14
    assert EMBEDDED_THING_CLASSES == tuple(source.name for source in THING_SOURCES)
    assert len(set(EMBEDDED_THING_CLASSES)) == NUM_THINGS
    assert EMBEDDED_THING_CLASSES[:3] == ("cat", "coffee", "astronaut")
    assert not set(EMBEDDED_THING_CLASSES) & set(EMBEDDED_STUFF_CLASSES)


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("source", THING_SOURCES, ids=lambda source: source.name)
def test_every_thing_picture_loads_offline_from_an_installed_package(offline, source):
    picture = bundled_picture(source.picture)
    assert picture.ndim in (2, 3) and min(picture.shape[:2]) >= 64
    if picture.ndim == 3:
        assert picture.shape[2] in ((4,) if source.matte == "alpha" else (3, 4))  # an ellipse cut ignores any alpha
    assert picture.dtype == (bool if source.matte == "silhouette" else np.uint8)
    x0, y0, x1, y1 = source.box
    assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
    # the object's region: a real picture (not a flat fill), at the stored side
    thing = S._load_thing(source, np.asarray(skimage.data.grass()))
    assert thing.rgb.ndim == 3 and thing.rgb.shape[2] == 3 and max(thing.rgb.shape[:2]) == S._SOURCE_SIDE
    assert thing.rgb.std() > 10.0
    if source.matte == "ellipse":
        assert thing.alpha is None
    else:
        assert thing.alpha.shape == thing.rgb.shape[:2] and (thing.alpha >= 0.5).any()
