import pytest

from updetr.data.embedded import generate_embedded

TINY = [
    "model.backbone=resnet18", "model.hidden_dim=32", "model.num_heads=4", "model.enc_layers=1",
    "model.dec_layers=2", "model.ffn_dim=64", "model.num_queries=8", "model.dropout=0.0",
    "pretrain.num_patches=2", "pretrain.query_size=32",
    "data.scales=[64,80]", "data.max_size=128", "data.crop_resize=[64]", "data.crop_size=[48,64]",
    "data.val_size=64", "data.batch_size=4", "data.num_workers=0", "optim.epochs=2",
]


@pytest.fixture(scope="session")
def tiny_overrides():
    """Config overrides for a model and data small enough for seconds-long CPU runs."""
    return list(TINY)


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded") / "bench"
    return generate_embedded(root, num_train=8, num_val=4, num_unlabeled=8, image_size=(64, 96), progress=False)
