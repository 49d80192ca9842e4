"""The page's answer time, measured in the browser: runs the browser test and summarises what it measured.

    python benchmarks/serve_latency.py [--artefacts docs/images] [--out benchmarks/results/serve_latency.txt]

The test (tests/serve/test_browser.py) pre-trains the embedded recipe's UP-DETR briefly on one photograph, serves
it, and in headless Chromium drags one box on the 512 x 512 astronaut 16 times; the page times each answer from the
mouse release to the boxes drawn (the request, the model, the drawing). The first answer is a warm-up; the other 15
are summarised. Torch runs with the test suite's 2 threads. The test writes ``serve.png`` (the README's screenshot)
and ``latency.json`` to ``--artefacts``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = "tests/serve/test_browser.py::test_a_box_drawn_with_the_mouse_is_found_by_the_pretrained_model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artefacts", default="docs/images", help="where the test writes serve.png and latency.json")
    parser.add_argument("--out", default="benchmarks/results/serve_latency.txt")
    args = parser.parse_args(argv)
    artefacts = (ROOT / args.artefacts).resolve()
    env = {**os.environ, "UPDETR_TEST_ARTEFACTS": str(artefacts), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run([sys.executable, "-m", "pytest", TEST, "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=env)
    if result.returncode != 0:
        print("serve_latency: the browser test failed; no numbers written", file=sys.stderr)
        return result.returncode
    data = json.loads((artefacts / "latency.json").read_text())
    page, model = data["page_ms"], data["model_ms"]
    text = (f"# python benchmarks/serve_latency.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip() + "\n"
            f"# {data['answers']} answers for one box {data['box']} on the {data['photo']} photograph, torch threads "
            f"{data['torch_threads']}; IoU of the found box {data['iou']}, score {data['score']}\n"
            f"page answer (mouse release to boxes drawn): median {page['median']} ms, IQR {page['q1']}-{page['q3']} ms, "
            f"range {page['min']}-{page['max']} ms\n"
            f"model alone: median {model['median']} ms, range {model['min']}-{model['max']} ms\n"
            f"all page answers (ms): {data['all_page_ms']}\n")
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
