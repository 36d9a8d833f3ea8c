"""``largebatch train | plan | study | keys``: parse, build, run. Bad input: one line, exit 2."""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import shutil
import sys
import textwrap
from typing import Optional, Sequence

from largebatch.config import ConfigError, load_config

DESCRIPTION = ("Train with one global batch on 1..N processes (DDP, DeepSpeed), plan the batch "
               "arithmetic, run the MNIST batch-size study, list the config keys.")
OVERRIDES = "dotted key=value overrides, applied over the file (see `largebatch keys`)"
EXAMPLES = {
    None: """\
examples:
  largebatch train configs/mnist/seed.yaml                       # one process, CPU or one GPU
  largebatch train configs/mnist/mlp.yaml optim.lr=0.1 train.epochs=2
  torchrun --standalone --nproc_per_node 2 -m largebatch train configs/mnist/seed.yaml \\
      batch.global_size=120 engine.name=ddp                      # 2 ranks, one global batch
  largebatch plan configs/mnist/seed.yaml batch.global_size=4096 --world-size 4
  largebatch study configs/mnist/study.yaml study.quick=true     # the batch-size study, ~1 min
  largebatch keys optim                                          # what every optim.* key means

Bad input (unknown key, wrong type, inconsistent batch) is one line on stderr and exit code 2.
MNIST is read from data.root ($LARGEBATCH_DATA_ROOT, else data/), downloaded there if missing.""",
    "train": """\
examples:
  largebatch train configs/mnist/seed.yaml
  largebatch train configs/mnist/seed.yaml data.root=../mnist data.download=false
  largebatch train configs/mnist/large_batch.yaml batch.global_size=4096 batch.micro_size=512
  torchrun --standalone --nproc_per_node 4 -m largebatch train configs/mnist/seed.yaml \\
      batch.global_size=240 engine.name=ddp

Writes log.out_dir/{plan.json,config.json,metrics.jsonl,summary.json,model.pt}.""",
    "plan": """\
examples:
  largebatch plan configs/mnist/seed.yaml
  largebatch plan configs/mnist/seed.yaml batch.global_size=4096 batch.micro_size=512 --world-size 4
  largebatch plan configs/mnist/large_batch.yaml --world-size 4 --json

Reads no data: prints global = micro x accum x world, steps per epoch, the scaled LR, warmup.""",
    "study": """\
examples:
  largebatch study configs/mnist/study.yaml                      # the full sweep, < 1 h on 2 cores
  largebatch study configs/mnist/study.yaml study.quick=true     # a smoke version, ~1 min
  largebatch study configs/mnist/study.yaml study.batch_sizes=[60,600] log.out_dir=runs/s2

Writes log.out_dir/study.md with its table, figures and verdicts.""",
    "status": """\
examples:
  largebatch status configs/mnist/seed.yaml log.out_dir=runs/a     # finished|resumable|fresh
  largebatch status configs/mnist/seed.yaml --json

Reads the run's checkpoint directory (no tensor is loaded). The sbatch scripts requeue a
pre-empted job only while this says 'resumable'.""",
    "keys": """\
examples:
  largebatch keys                  # every key: type, default, allowed values, meaning
  largebatch keys optim            # only optim.*
  largebatch keys schedule.plateau""",
}


def _sub(sub: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text, epilog=EXAMPLES[name],
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="largebatch", description=DESCRIPTION, epilog=EXAMPLES[None],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = _sub(sub, "train", "train one run")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help=OVERRIDES)
    pl = _sub(sub, "plan", "print the batch plan without training")
    pl.add_argument("config", help="YAML config file")
    pl.add_argument("overrides", nargs="*", help=OVERRIDES)
    pl.add_argument("--world-size", type=int, default=None,
                    help="world size to plan for (default: the launch's)")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    st = _sub(sub, "study", "run the MNIST batch-size study")
    st.add_argument("config", help="study YAML (e.g. configs/mnist/study.yaml)")
    st.add_argument("overrides", nargs="*", help=OVERRIDES)
    s = _sub(sub, "status", "say whether a run is finished, resumable or fresh")
    s.add_argument("config", help="YAML config file (with the run's overrides)")
    s.add_argument("overrides", nargs="*", help=OVERRIDES)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    k = _sub(sub, "keys", "list every config key with its type, default, choices and meaning")
    k.add_argument("prefix", nargs="?", default="",
                   help="show only keys starting with this (e.g. optim, schedule.plateau)")
    for name, module in COMMAND_MODULES.items():
        mod = importlib.import_module(module)
        cmd = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                             epilog=getattr(mod, "EXAMPLES", None),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(cmd)
        cmd.set_defaults(run_command=mod.run, hard_exit=getattr(mod, "HARD_EXIT", False))
    return p


#: Subcommands that live in their own module (kept light to import: heavy imports go inside
#: ``run``): name -> module with ``HELP``, optional ``EXAMPLES``, ``add_arguments(parser)``
#: and ``run(args) -> exit code``; a ConfigError they raise is a one-line error, exit 2.
COMMAND_MODULES: dict[str, str] = {
    "lr-find": "largebatch.cli.lr_find",
    "plot": "largebatch.plot",
    "noise-scale": "largebatch.cli.noise_scale",
}


def _cmd_plan(args: argparse.Namespace) -> int:
    from largebatch.dist import detect_launch
    from largebatch.train.build import plan_for
    cfg = load_config(args.config, args.overrides)
    world = args.world_size if args.world_size is not None else detect_launch().world_size
    plan = plan_for(cfg, world)
    if cfg.task.name == "face":
        from largebatch.plan import describe_face_head, face_head_plan
        if args.json:
            print(json.dumps({**plan.to_json(), "face_head": face_head_plan(cfg, plan)}))
        else:
            print(plan.describe() + "\n" + describe_face_head(cfg, plan))
        return 0
    print(json.dumps(plan.to_json()) if args.json else plan.describe())
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from largebatch.checkpoint import run_status
    from largebatch.train.build import checkpoint_dir
    cfg = load_config(args.config, args.overrides)
    directory = checkpoint_dir(cfg)
    status = {**run_status(directory), "dir": str(directory)}
    if args.json:
        print(json.dumps(status))
    else:
        where = f" at step {status['step']} ({status['set']})" if status["step"] is not None else ""
        print(f"{status['state']}{where}: {directory}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from largebatch.dist import destroy_process_group
    from largebatch.train.build import train
    cfg = load_config(args.config, args.overrides)
    train(cfg)
    destroy_process_group()
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from largebatch.study.runner import run_study
    cfg = load_config(args.config, args.overrides)
    run_study(cfg, config_path=args.config, overrides=args.overrides)
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from largebatch.config import Config, _CHOICES  # read-only: the allowed values per key
    from largebatch.config.io import key_rows
    rows = [r for r in key_rows(Config) if r.key.startswith(args.prefix)]
    if not rows:
        raise ConfigError(f"no config key starts with {args.prefix!r} (see `largebatch keys`)")
    width = max(80, min(120, shutil.get_terminal_size((100, 24)).columns))
    print(render_keys(rows, _CHOICES, width))
    return 0


def render_keys(rows: list, choices: dict, width: int = 100) -> str:
    """The key reference as a table grouped by section; each key's doc wrapped beneath it."""
    from largebatch.config.io import format_value
    cells = [(r.key, r.type, format_value(r.default), ", ".join(map(str, choices.get(r.key, ()))))
             for r in rows]
    key_w = max(len(c[0]) for c in cells)
    type_w = max(len(c[1]) for c in cells)
    default_w = min(24, max(len(c[2]) for c in cells))
    choice_w = max(16, width - 2 - key_w - type_w - default_w - 6)
    widths = (key_w, type_w, default_w, choice_w)
    out = [_table_line(("key", "type", "default", "choices"), widths),
           _table_line(tuple("-" * w for w in widths), widths)]
    by_section = itertools.groupby(zip(rows, cells), key=lambda rc: rc[0].key.rsplit(".", 1)[0])
    for section, group in by_section:
        group = list(group)
        out += ["", f"{section}: {group[0][0].section_doc}"]
        for row, cell in group:
            out.append(_table_line(cell, widths))
            out += textwrap.wrap(row.doc, width - 6, initial_indent=" " * 6,
                                 subsequent_indent=" " * 6)
    return "\n".join(out)


def _table_line(cells: tuple, widths: tuple) -> str:
    """One table row; a cell longer than its column wraps onto continuation lines."""
    wrapped = [textwrap.wrap(c, w, break_on_hyphens=False) or [""] for c, w in zip(cells, widths)]
    lines = []
    for parts in itertools.zip_longest(*wrapped, fillvalue=""):
        lines.append("  " + "  ".join(p.ljust(w) for p, w in zip(parts, widths)).rstrip())
    return "\n".join(lines)


def _all_ranks_printed() -> None:
    """Wait until every rank has printed an error that all ranks raised (a failed download).

    torchrun stops the other workers as soon as one exits with an error, so without this a
    rank that is a little behind would be killed before it says why.
    """
    import torch.distributed as torch_dist
    if torch_dist.is_initialized():
        try:
            torch_dist.barrier()
        except RuntimeError:  # a rank is gone after all: nothing left to wait for
            pass


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
    commands = {"train": _cmd_train, "plan": _cmd_plan, "study": _cmd_study, "keys": _cmd_keys,
                "status": _cmd_status}
    if getattr(args, "run_command", None) is not None:
        commands[args.command] = args.run_command
    # A real process (not a test calling main([...])) that trained exits hard once flushed.
    hard = argv is None and (args.command in ("train", "study")
                             or getattr(args, "hard_exit", False))
    try:
        code = commands[args.command](args)
    except ConfigError as exc:
        # The whole line in one write: ranks share the launcher's stderr pipe, and print()
        # writes the text and the newline separately, so two ranks' lines could interleave.
        sys.stderr.write(f"largebatch: error: {exc}\n")
        sys.stderr.flush()
        code = 2
        if getattr(exc, "all_ranks", False):
            _all_ranks_printed()
    except KeyboardInterrupt:
        print("largebatch: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `largebatch keys | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    if hard:
        _hard_exit(code)
    sys.exit(code)
