"""`updetr serve` as a real process: it says where it listens (127.0.0.1 unless told), refuses bad input with a
message and the right status, never writes an upload's name anywhere, and answers a good request after each bad one."""

import io
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from updetr.cli import main
from updetr.serve import address_note, find_demo_checkpoints


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def server(fake_demo, tmp_path):
    """`updetr serve --demo DEMO` (no checkpoint flags: it finds the demo's), run from an empty folder."""
    port = _free_port()
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "updetr", "serve", "--demo", str(fake_demo), "--port", str(port),
                             "--threads", "1"], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "open http://" in line:
            break
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/info", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    yield proc, url, "".join(lines), workdir
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_bad_requests_are_refused_with_a_message_and_the_server_keeps_answering(server, fake_demo):
    proc, url, printed, workdir = server
    stages = fake_demo / "stages"
    assert f"using the demo's checkpoints in {fake_demo}/stages" in printed
    assert str(stages / "pretrain-0a1b2c3d4e" / "checkpoint.pth") in printed
    assert str(stages / "updetr-5f6a7b8c9d" / "checkpoint.pth") in printed  # the fine-tuned UP-DETR, not DETR
    assert f"one-shot: {stages / 'oneshot-1111111111' / 'checkpoint.pth'}" in printed  # initialised from UP-DETR
    assert f"open {url}/ (bound to 127.0.0.1: this machine only" in printed

    client = httpx.Client(base_url=url, timeout=60)

    def good():
        answer = client.post("/api/query", json={"image": "astronaut", "box": [100, 80, 120, 140]})
        assert answer.status_code == 200, answer.text
        patch, same_kind = answer.json()["answers"]
        assert patch["model"] == "pretrain" and len(patch["boxes"]) == 2 and patch["ms"] > 0  # Q/M = 10/5 queries
        assert same_kind["model"] == "oneshot" and len(same_kind["boxes"]) == 10 and same_kind["ms"] > 0
        detected = client.post("/api/detect", json={"image": "coffee"})
        assert detected.status_code == 200
        assert {b["label"] for b in detected.json()["answers"][0]["boxes"]} <= {"cat", "coffee", "rocket"}

    good()
    bomb = _png(10_000, 10_000, "1")  # 12 kB of PNG that decodes to 100 megapixels
    assert len(bomb) < 50_000
    bad = [
        (dict(method="POST", url="/api/upload", content=b"GIF89a? no, just text"), 415, "not an image file"),
        (dict(method="POST", url="/api/upload", content=b""), 415, "the file is empty"),
        (dict(method="POST", url="/api/upload", content=bomb), 413, "10000x10000 pixels is larger than the limit"),
        (dict(method="POST", url="/api/upload", content=_png(4100, 4000, "1")), 413, "larger than this server's limit"),
        (dict(method="POST", url="/api/upload", content=b"\0" * (9 * 1024 * 1024)), 413, "larger than the limit of"),
        (dict(method="POST", url="/api/upload", content=_png(64, 64)[:60]), 400, "upload: cannot decode"),
        (dict(method="POST", url="/api/query", json={"image": "astronaut", "box": [10, 10, 0, 50]}), 400, "zero size"),
        (dict(method="POST", url="/api/query", json={"image": "astronaut", "box": [400, 10, 200, 50]}), 400,
         "lies outside the 512x512 image"),
        (dict(method="POST", url="/api/query", json={"image": "astronaut", "box": [-5, 10, 50, 50]}), 400, "outside"),
        (dict(method="POST", url="/api/query", json={"image": "astronaut", "box": [1, 1, 3, 3]}), 400, "smallest patch"),
        (dict(method="POST", url="/api/query", json={"image": "astronaut", "box": [1, 2, "NaN", 3]}), 400, "finite"),
        (dict(method="POST", url="/api/query", json={"image": "astronaut", "box": [1, 2]}), 400, "four numbers"),
        (dict(method="POST", url="/api/query", content=b"{oops"), 400, "must be JSON"),
        (dict(method="POST", url="/api/query", content=b"[1, 2]"), 400, "JSON object"),
        (dict(method="POST", url="/api/query", content=b"{" + b" " * 20_000 + b"}"), 413, "larger than the limit"),
        (dict(method="POST", url="/api/query", json={"image": "../../../etc/passwd", "box": [1, 1, 20, 20]}), 404,
         "no such picture"),
        (dict(method="POST", url="/api/query", json={"image": "astronaut", "target": "nope", "box": [1, 1, 20, 20]}),
         404, "target 'nope': no such picture"),
        (dict(method="GET", url="/api/images/..%2F..%2Fetc%2Fpasswd"), 404, "Not Found"),
        (dict(method="GET", url="/api/images/upload-0000000000000000"), 404, "no such picture"),
        (dict(method="GET", url="/static/../../pyproject.toml"), 404, "Not Found"),
        (dict(method="GET", url="/api/query"), 405, "Method Not Allowed"),
    ]
    for request, status, message in bad:
        answer = client.request(**request)
        assert answer.status_code == status, (request["url"], answer.text)
        assert message in answer.json()["error"], (request["url"], answer.text)
        good()
        assert proc.poll() is None  # still serving

    # a good upload works; its name, even sent along in a header, goes nowhere: the id is random
    name = "../../evil name.png"
    answer = client.post("/api/upload", content=_png(320, 240), headers={"X-Filename": name})
    assert answer.status_code == 200
    added = answer.json()
    assert added["id"].startswith("upload-") and "evil" not in added["id"] and (added["width"], added["height"]) == (320, 240)
    found = client.post("/api/query", json={"image": added["id"], "box": [40, 40, 100, 80], "target": "astronaut"})
    assert found.status_code == 200 and found.json()["target"] == "astronaut"
    assert client.get(added["url"]).headers["content-type"] == "image/jpeg"
    assert list(workdir.iterdir()) == [] and not (workdir.parent / "evil name.png").exists()
    large = client.post("/api/upload", content=_png(2000, 1500))  # kept at 1280 px, boxes in the kept pixels
    assert large.status_code == 200 and (large.json()["width"], large.json()["height"]) == (1280, 960)
    assert proc.poll() is None


def test_the_address_says_who_can_reach_the_page():
    assert "bound to 127.0.0.1: this machine only" in address_note("127.0.0.1", 8000)
    assert "http://[::1]:8000/ (bound to ::1: this machine only" in address_note("::1", 8000)
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        assert "reachable from the network" in address_note(host, 8000)


def test_demo_checkpoints_are_found_and_a_missing_demo_says_how_to_make_one(fake_demo, tmp_path, capsys):
    found = find_demo_checkpoints(fake_demo)
    assert found.pretrain.parent.name.startswith("pretrain-") and found.detector.parent.name.startswith("updetr-")
    assert found.oneshot.parent.name == "oneshot-1111111111"  # the one initialised from the pre-training
    assert main(["serve", "--demo", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "no finished demo in" in err and "run `updetr demo` first" in err and "--checkpoint PRE.pth" in err
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth: checkpoint file not found" in capsys.readouterr().err
