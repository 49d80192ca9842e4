"""Exemplar boxes and their query patches (``updetr.data.exemplar_patches``)."""

import pytest

from updetr.data.exemplar_patches import check_exemplar_box
from updetr.data.io import DataError


def test_exemplar_box_checks():
    check_exemplar_box((0, 0, 48, 48), (48, 48), 8, "x.jpg")
    with pytest.raises(DataError, match="x.jpg: exemplar box .* outside the 48x40"):
        check_exemplar_box((30, 0, 50, 20), (40, 48), 8, "x.jpg")
    with pytest.raises(DataError, match="smaller than the minimum 8x8"):
        check_exemplar_box((0, 0, 20, 5), (40, 48), 8, "x.jpg")
