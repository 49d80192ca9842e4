import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: every model test runs on one thread (``one_thread`` in tests/conftest.py)."""
    yield
