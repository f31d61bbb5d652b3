"""The ``mpae`` console script and ``python -m mpae_lightning``.

``mpae --version`` is answered here, without importing PyTorch or Lightning (several seconds of
CPU time); everything else goes to :func:`mpae_lightning.cli.main`.
"""
from __future__ import annotations

import sys

VERSION_FLAGS = ("--version", "-V")


def main(args: list[str] | None = None) -> None:
    """Console entry point: print the version cheaply, else run the full CLI.

    The version text is what the CLI's parser prints (argparse's ``%(prog)s <version>``, e.g.
    ``mpae 0.1.0``); ``--debug`` before the flag is allowed, as the full CLI allows it.
    """
    argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
    first = next((a for a in argv if a != "--debug"), None)
    if first in VERSION_FLAGS:
        import argparse

        from . import __version__

        print(f"{argparse.ArgumentParser(add_help=False).prog} {__version__}")
        return
    from .cli import main as cli_main

    cli_main(args)


if __name__ == "__main__":
    main()
