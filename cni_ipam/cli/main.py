"""The admin CLI (CNI_COMMAND unset).

Subcommands live in modules that each provide ``register(subparsers)``; every leaf
parser sets ``func`` (``args -> exit code``).  ``labels`` (namespace/node commands)
and ``install`` are optional modules.  Errors: ONE line ``cni-ipam: error: <msg>`` on
stderr and exit 1 (argparse usage errors exit 2) -- never a traceback
(``CNI_IPAM_DEBUG=1`` adds one for unexpected internal errors).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..cni.version import SUPPORTED_VERSIONS as SUPPORTED

MODULES = ["pools", "inspect", "repair", "reservations"]
OPTIONAL_MODULES = ["labels", "install", "controller", "execserver"]


def version_text() -> str:
    from .._version import build_info  # version, git commit (baked in at build time when frozen)
    b = build_info()
    built = f", built {b['built']}" if b["built"] else ""
    return (f"cni-ipam {b['version']}\ngit commit: {b['commit']} ({b['mode']}{built})\n"
            f"CNI spec versions: {', '.join(SUPPORTED)}")


class Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for a mistyped (sub)command (`shwo`, `pools`)."""

    def error(self, message):
        import re
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            import difflib
            choices = re.findall(r"'([^']*)'", m.group(2))
            close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.5)
            if close:
                message = f"unknown command {m.group(1)!r} (did you mean {close[0]!r}?)"
            else:
                message = f"unknown command {m.group(1)!r} (commands: {', '.join(choices)})"
        super().error(message)


def _help_topic(args) -> int:
    from . import helptext
    from .common import CONNECTION_HELP
    topic = args.topic
    if topic is None:
        print("help topics: " + ", ".join(helptext.TOPICS) + "  (and `cni-ipam COMMAND --help`)")
        return 0
    text = CONNECTION_HELP if topic == "connection" else helptext.TOPICS[topic]
    sys.stdout.write(text or "")
    return 0


def _help(parser):
    def show(args) -> int:
        parser.print_help(sys.stderr)
        return 2
    return show


def build_parser() -> argparse.ArgumentParser:
    from .helptext import EPILOG
    p = Parser(prog="cni-ipam", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG, description=(
        "cni-ipam: a CNI IPAM plugin (node-affine blocks in etcd). Run by a container runtime with "
        "CNI_COMMAND set it is the plugin; without it, this admin CLI."))
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    v = sub.add_parser("version", help="print the version and the supported CNI versions")
    v.set_defaults(func=lambda args: print(version_text()) or 0)
    from .helptext import TOPICS
    h = sub.add_parser("help", help="help on a topic: connection, output (-o json/yaml shapes), exit-codes")
    h.add_argument("topic", nargs="?", choices=list(TOPICS), metavar="TOPIC",
                   help="connection | output | exit-codes")
    h.set_defaults(func=_help_topic)
    for name in MODULES + OPTIONAL_MODULES:
        try:
            mod = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError:
            if name in OPTIONAL_MODULES:
                continue
            raise
        mod.register(sub)
    # a group command without its subcommand (e.g. `cni-ipam pool`) prints its help
    for name, sp in sub.choices.items():
        if sp.get_default("func") is None:
            sp.set_defaults(func=_help(sp))
    return p


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split()) or "unknown error"


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.version:
        print(version_text())
        return 0
    func = getattr(args, "func", None)
    if func is None:
        p.print_help()
        return 0
    from ..config import ConfigError
    from ..datastore import DatastoreError, DatastoreUnavailable
    from ..ipam.errors import IPAMError
    from .common import CLIError, close_all
    try:
        return int(func(args) or 0)
    except CLIError as e:
        msg = str(e)
    except IPAMError as e:
        msg = e.msg
        problems = getattr(e, "problems", None)
        if problems and len(problems) > 1:   # `apply`: every problem of the manifests, one line each
            print(f"cni-ipam: error: {_one_line(msg)}", file=sys.stderr)
            for prob in problems[:100]:
                print(f"  {_one_line(prob)}", file=sys.stderr)
            if len(problems) > 100:
                print(f"  ... and {len(problems) - 100} more", file=sys.stderr)
            close_all()
            return int(getattr(args, "error_exit", 1))
    except DatastoreUnavailable as e:
        msg = str(e)
        if getattr(e, "unreachable", False):
            from .common import unreachable_hint
            msg += unreachable_hint()
    except DatastoreError as e:
        msg = str(e) if str(e).lower().startswith("etcd") else f"etcd: {e}"
    except ConfigError as e:
        msg = str(e)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`cni-ipam show | head`): not an error worth a message
        try:   # (the Python docs' recipe: no "Exception ignored" noise when stdout is flushed at exit)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except Exception as e:  # never a traceback in front of an operator
        if os.environ.get("CNI_IPAM_DEBUG"):
            import traceback
            traceback.print_exc()
        msg = f"internal error: {type(e).__name__}: {e} (set CNI_IPAM_DEBUG=1 for a traceback)"
    finally:
        close_all()
    print(f"cni-ipam: error: {_one_line(msg)}", file=sys.stderr)
    return int(getattr(args, "error_exit", 1))


if __name__ == "__main__":
    sys.exit(main())
