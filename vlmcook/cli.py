"""`vlmcook <command>`: a table of commands, each a plain function; heavy imports happen inside the command."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from vlmcook.demo import run

    return run(out=args.out, seed=args.seed)


def _info(args) -> int:
    from vlmcook.checkpoint import scan_checkpoint
    from vlmcook.config import MiniCPMVConfig

    cfg = MiniCPMVConfig.from_file(args.model)
    entries = scan_checkpoint(args.model)
    groups: dict[str, int] = {}
    for name, e in entries.items():
        n = 1
        for s in e.shape:
            n *= s
        groups[name.split(".")[0]] = groups.get(name.split(".")[0], 0) + n
    print(f"{args.model}: {len(entries)} tensors, {sum(groups.values()):,} parameters "
          f"({', '.join(f'{k} {v:,}' for k, v in groups.items())})")
    print(f"llm: {cfg.llm.num_hidden_layers} layers x {cfg.llm.hidden_size}, vocab {cfg.llm.vocab_size}; "
          f"vision: {cfg.vision.num_hidden_layers} layers x {cfg.vision.hidden_size}; "
          f"{cfg.query_num} tokens per view or video package; views of ~{cfg.scale_resolution}px, "
          f"up to {cfg.max_slice_nums} slices")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmcook", description="MiniCPM-V 4.5 in plain PyTorch: run, train, reproduce.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="the main job on the built-in tiny model (CPU, minutes)",
                       description="Runs the project's main job on the tiny preset and writes a report.")
    d.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    d.set_defaults(fn=_demo)

    i = sub.add_parser("info", help="describe a checkpoint folder (validates every shard without loading)")
    i.add_argument("model", help="checkpoint folder in the released layout")
    i.set_defaults(fn=_info)

    data = sub.add_parser("data", help="generate training data").add_subparsers(dest="data_command", required=True,
                                                                                 metavar="KIND")
    try:
        from vlmcook.data.docs.cli import add_parser as add_docs_parser
    except ImportError:  # the document-data extra is not installed
        add_docs_parser = None
    if add_docs_parser is not None:
        add_docs_parser(data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # our input errors carry their own context; no traceback
        print(f"vlmcook {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
