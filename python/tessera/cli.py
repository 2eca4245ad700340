"""The `tessera` command line.

    tessera run [RECIPE.yaml] [key=value ...]   train (no recipe: the embedded demo on 2 CPU ranks)
    tessera config [RECIPE.yaml] [key=value ...] print the resolved config
    tessera fetch NAME [--cache-dir DIR]        download and convert a pretrained model; prints its directory
    tessera fetch --list                        the models fetch knows
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from tessera.errors import TesseraError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tessera", description="tessera: sharded training for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "train from a recipe (default: the embedded demo)"),
                            ("config", "print the resolved config of a recipe")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("args", nargs="*", help="[RECIPE.yaml] followed by key=value overrides")
    p = sub.add_parser("fetch", help="download and convert a pretrained model; prints its directory (last line)")
    p.add_argument("name", nargs="?", help="model name (see --list)")
    p.add_argument("--list", action="store_true", help="list the models fetch knows")
    p.add_argument("--cache-dir", help="cache root (default: $TESSERA_CACHE_DIR, else ~/.cache/tessera); the model "
                   "goes to CACHE_DIR/models/NAME")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ns = parser.parse_args(argv)
    if ns.command == "fetch":
        return _fetch(parser, ns)
    recipe = ns.args[0] if ns.args and "=" not in ns.args[0] else None
    overrides = ns.args[1:] if recipe else ns.args
    from tessera.recipes.config import load_config

    try:
        cfg = load_config(recipe, overrides)
        if ns.command == "config":
            for f in dataclasses.fields(cfg):
                v = getattr(cfg, f.name)
                print(f"{f.name}: {getattr(v, 'value', v)}")
            return 0
        from tessera.recipes.train import run

        run(cfg)
    except TesseraError as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    return 0


def _fetch(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    from tessera.models.fetch import available, describe, fetch

    if ns.list:
        for name in available():
            print(f"{name}  {describe(name)}")
        return 0
    if ns.name is None:
        parser.error("fetch: give a model NAME or --list")
    try:
        path = fetch(ns.name, cache_dir=ns.cache_dir, progress=not ns.quiet)
    except TesseraError as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    print(path)  # the last line of stdout, for dir=$(tessera fetch NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
