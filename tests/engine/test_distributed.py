"""Process-group set-up from torchrun's environment."""

import socket

import torch.distributed as dist

from updetr.engine.distributed import init_distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_plain_process_has_no_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed("cpu")
    assert (info.world_size, info.enabled, dist.is_initialized()) == (1, False, False)


def test_torchrun_with_one_process_gets_a_gloo_group_on_cpu(monkeypatch):
    env = {"TORCHELASTIC_RUN_ID": "test", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        info = init_distributed("cpu")
        assert info.enabled and info.is_main
        assert dist.get_backend() == "gloo" and dist.get_world_size() == 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
