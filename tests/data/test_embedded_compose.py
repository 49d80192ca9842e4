"""One image of the embedded benchmark (``updetr.data.embedded_compose``): every thing class can be drawn,
and the composed instances have disjoint visible masks with tight boxes."""

import numpy as np
import pytest

from updetr.data import embedded_compose as C
from updetr.data.embedded import _tight_box
from updetr.data.embedded_compose import DEFAULT_MAX_OBJECTS, compose
from updetr.data.embedded_sources import EMBEDDED_THING_CLASSES, load_assets

NUM_THINGS = len(EMBEDDED_THING_CLASSES)


@pytest.fixture(scope="module")
def assets():
    return load_assets()


@pytest.mark.parametrize("index", range(NUM_THINGS), ids=list(EMBEDDED_THING_CLASSES))
def test_each_thing_class_can_be_drawn_into_a_box(assets, index):
    thing = assets.things[index]
    rgb, alpha = C._thing_patch(np.random.default_rng(index), thing, 40, 56)
    assert rgb.shape == alpha.shape + (3,) and alpha.shape[0] <= 40 and alpha.shape[1] <= 56
    solid = alpha >= 0.5
    # cropped to its support: the matte reaches every side of the patch, and covers a fair part of it
    assert solid[0].any() and solid[-1].any() and solid[:, 0].any() and solid[:, -1].any()
    assert solid.mean() > 0.2 and 0.0 <= rgb.min() and rgb.max() <= 255.0 and rgb[solid].std() > 5.0


def test_composed_images_draw_every_class_and_box_each_instance_tightly(assets):
    seen = set()
    for i in range(40):
        composite = compose(np.random.default_rng([7, i]), assets, 96, 128)
        assert composite.image.shape == (96, 128, 3) and composite.image.dtype == np.uint8
        assert 1 <= len(composite.instances) <= DEFAULT_MAX_OBJECTS
        owners = np.zeros((96, 128), dtype=int)
        for instance in composite.instances:
            assert instance.mask.shape == (96, 128) and instance.mask.any()
            assert not (owners[instance.mask]).any()  # visible masks never overlap
            owners[instance.mask] = 1
            x, y, w, h = _tight_box(instance.mask)
            inside = instance.mask[y:y + h, x:x + w]
            assert inside.sum() == instance.mask.sum()  # the box holds the whole mask ...
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()  # ... tightly
            seen.add(instance.class_index)
        assert np.all(composite.stuff[owners > 0] == -1)  # no stuff under a thing
    assert seen == set(range(NUM_THINGS))
