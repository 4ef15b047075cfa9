"""Train a class-conditional DiT on stored latents.

    accelerate launch tools/train.py --config configs/fashion_mnist.yaml [section.field=value ...]
    accelerate launch --multi_gpu --num_processes 2 tools/train.py --config ... --resume auto

``python -m latentdit.launch`` takes the same arguments as ``accelerate launch`` and ends a user error
(a bad field, missing latents...) with its one-line message, shown once, and exit status 2 instead of
the launcher's traceback.

Overrides such as ``train.lr=2e-4 model.name=DiT-B/2`` change single config fields (before or after
the options). ``--resume auto`` continues the latest checkpoint of the run directory (or starts fresh
if it has none); ``--resume PATH`` continues a given checkpoint (or a run directory's latest).
"""

from __future__ import annotations

from typing import Sequence

from latentdit.cli import existing_file, make_parser, parse_with_overrides, run_main


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=existing_file, required=True, help="YAML config (see configs/)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue the latest checkpoint of the run dir ('auto') or a given checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, e.g. train.lr=2e-4 model.name=DiT-B/2")
    args = parse_with_overrides(parser, argv)  # overrides may stand before or after options

    from latentdit.config import load_config
    from latentdit.training import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    from latentdit.cli import is_main_process

    if is_main_process():
        print(f"finished at step {result.step} ({result.stop_reason}); run dir {result.run_dir}; "
              f"last checkpoint {result.last_checkpoint}")
    return 0


if __name__ == "__main__":
    run_main(main)
