"""``largebatch train | plan | study | keys``: parse, build, run. Bad input: one line, exit 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from largebatch.config import ConfigError, describe, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="largebatch", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one run")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides (CLI > file)")
    pl = sub.add_parser("plan", help="print the batch plan without training")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--world-size", type=int, default=None,
                    help="world size to plan for (default: the launch's)")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    st = sub.add_parser("study", help="run the MNIST batch-size study")
    st.add_argument("config")
    st.add_argument("overrides", nargs="*")
    sub.add_parser("keys", help="list every config key with its default and meaning")
    return p


def _cmd_plan(args: argparse.Namespace) -> int:
    from largebatch.dist import detect_launch
    from largebatch.run import plan_for
    cfg = load_config(args.config, args.overrides)
    world = args.world_size if args.world_size is not None else detect_launch().world_size
    plan = plan_for(cfg, world)
    print(json.dumps(plan.to_json()) if args.json else plan.describe())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from largebatch.dist import destroy_process_group
    from largebatch.run import train
    cfg = load_config(args.config, args.overrides)
    train(cfg)
    destroy_process_group()
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from largebatch.study.runner import run_study
    cfg = load_config(args.config, args.overrides)
    run_study(cfg, config_path=args.config, overrides=args.overrides)
    return 0


def _cmd_keys(_: argparse.Namespace) -> int:
    for key, default, text in describe():
        print(f"{key} = {default!r}\n    {text}")
    return 0


def _hard_exit(code: int) -> None:
    """Exit without running interpreter teardown once everything is flushed.

    Distributed runs (gloo/nccl/DeepSpeed threads) sometimes abort in C++ static destructors
    *after* a successful run ("terminate called without an active exception"), turning a
    finished run into a failed launch. Flushing and calling ``os._exit`` skips that teardown.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``largebatch`` command and ``python -m largebatch``."""
    parser = _parser()
    # Options may come after the overrides (`plan cfg.yaml a=1 --json`): collect leftovers.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    commands = {"train": _cmd_train, "plan": _cmd_plan, "study": _cmd_study, "keys": _cmd_keys}
    # A real process (not a test calling main([...])) that trained exits hard once flushed.
    hard = argv is None and args.command in ("train", "study")
    try:
        code = commands[args.command](args)
    except ConfigError as exc:
        print(f"largebatch: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("largebatch: interrupted", file=sys.stderr)
        code = 130
    if hard:
        _hard_exit(code)
    sys.exit(code)
