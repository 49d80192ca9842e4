"""Fixtures for every test. ``python -m pytest -m "not slow"`` leaves out the tests marked slow (see the marker in
pyproject.toml) and runs the rest in about a minute; ``python -m pytest`` runs them all."""

import os
from contextlib import contextmanager

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY = [
    "model.backbone=resnet18", "model.hidden_dim=32", "model.num_heads=4", "model.enc_layers=1",
    "model.dec_layers=2", "model.ffn_dim=64", "model.num_queries=8", "model.dropout=0.0",
    "pretrain.num_patches=2", "pretrain.query_size=32",
    "data.scales=[64,80]", "data.max_size=128", "data.crop_resize=[64]", "data.crop_size=[48,64]",
    "data.val_size=64", "data.batch_size=4", "data.num_workers=0", "optim.epochs=2",
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _cache_folder(tmp_path_factory):
    """Caches that updetr can rebuild (image lists) go to a temporary folder, not ~/.cache."""
    from updetr.data.io import CACHE_ENV

    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("updetr-cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def threads():
    """:func:`torch_threads`, for fixtures wider than one test (``one_thread`` is per test)."""
    return torch_threads


@pytest.fixture
def one_thread():
    # tiny models: one thread is as fast, and much faster when other processes keep both cores busy
    with torch_threads(1):
        yield


def _colourful(height: int, width: int, seed: int):
    """A smooth, saturated (h, w, 3) uint8 image (varied hues, so colour ops show)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    phase = rng.uniform(0, 2 * np.pi, 3)
    channels = [np.sin(6 * x + 4 * y + p) for p in phase]
    return ((np.stack(channels, -1) * 0.5 + 0.5) * 255).astype(np.uint8)


@pytest.fixture(scope="session")
def colourful():
    """``colourful(height, width, seed)``: a smooth, saturated (h, w, 3) uint8 test image."""
    return _colourful


@pytest.fixture(scope="session")
def tiny_overrides():
    """Config overrides for a model and data small enough for seconds-long CPU runs."""
    return list(TINY)


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    from updetr.data.embedded import generate_embedded

    root = tmp_path_factory.mktemp("embedded") / "bench"
    return generate_embedded(root, num_train=8, num_val=4, num_unlabeled=8, image_size=(64, 96), progress=False)


@pytest.fixture(scope="session")
def load_script():
    """``load_script("studies/patch_swap.py")``: a script of the repository (not a package module) imported by path."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def load(relative: str):
        path = root / relative
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load

