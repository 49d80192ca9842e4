"""Which parts of an UP-DETR pre-training help or hurt fine-tuning? Start from some of them only.

    python studies/partial_init.py PRETRAIN_CKPT FINETUNE_RUN OUT.pth --fresh PREFIX [PREFIX ...]

Writes OUT.pth: the pre-training checkpoint PRETRAIN_CKPT with every tensor whose name starts with one of the
``--fresh`` prefixes replaced by the fresh initialisation a from-scratch DETR of FINETUNE_RUN's configuration gets
(``DetectionTask.build_model`` under ``torch.manual_seed(seed)``, as ``updetr train`` draws it). Fine-tuning from OUT.pth with
FINETUNE_RUN's configuration then starts from the pre-trained weights everywhere else:

    updetr train --config FINETUNE_RUN/config.json --set output_dir=RUN --set init_from=OUT.pth

Prefixes name the model's parts: ``input_proj.`` and ``transformer.encoder.`` (the encoder side),
``transformer.decoder.``, ``query_embed.`` and ``bbox_embed.`` (the decoder side). The CNN is never touched (the
pre-training froze it). Pretext-only tensors (``patch2query``, ``feature_align``, the pretext class head) are left
as they are; fine-tuning drops them anyway.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from updetr.config import Config, ConfigError
from updetr.data.io import DataError
from updetr.engine.checkpoint import CheckpointError, load_checkpoint
from updetr.engine.detection import DetectionTask

PARTS = ("input_proj.", "transformer.encoder.", "transformer.decoder.", "query_embed.", "bbox_embed.")


def fresh_state(finetune_cfg: Config) -> dict[str, torch.Tensor]:
    """The state dict of a from-scratch DETR of this configuration, drawn as ``updetr train`` draws it."""
    task = DetectionTask(finetune_cfg.override(['init_from=""']))
    torch.manual_seed(finetune_cfg.seed)  # the order of engine.loop.fit: seed, datasets (the classes), model
    task.train_dataset()
    task.val_dataset()
    return task.build_model().state_dict()


def partial_checkpoint(pretrain: dict, fresh: dict[str, torch.Tensor], prefixes: list[str]) -> tuple[dict, list[str]]:
    """``pretrain`` (a loaded checkpoint) with the tensors under ``prefixes`` taken from ``fresh``; and their names."""
    state = dict(pretrain["model"])
    replaced = sorted(k for k in state if k.startswith(tuple(prefixes)))
    if not replaced:
        raise ValueError(f"no tensor under {', '.join(prefixes)}: not a DETR / UP-DETR checkpoint")
    for key in replaced:
        if key not in fresh or fresh[key].shape != state[key].shape:
            raise ValueError(f"{key}: not in the fine-tuning model, or another shape")
        state[key] = fresh[key].clone()
    return {**pretrain, "model": state}, replaced


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pretrain_ckpt", type=Path)
    parser.add_argument("finetune_run", type=Path, help="a fine-tuning run folder (its config.json)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--fresh", nargs="+", required=True, choices=PARTS, metavar="PREFIX",
                        help=f"parts to start fresh, from {', '.join(PARTS)}")
    args = parser.parse_args()
    try:
        cfg = Config.load(args.finetune_run / "config.json")
        ckpt, replaced = partial_checkpoint(load_checkpoint(args.pretrain_ckpt), fresh_state(cfg), args.fresh)
    except (ConfigError, DataError, CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # a pre-trained tensor the fine-tuning model does not have
        print(f"error: {args.pretrain_ckpt} does not fit {args.finetune_run / 'config.json'}: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(args.out)
    print(f"{args.out}: {len(replaced)} tensors fresh ({', '.join(args.fresh)}), the rest from {args.pretrain_ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
