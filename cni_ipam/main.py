"""One program: the CNI plugin when CNI_COMMAND is set, the admin CLI otherwise."""
import os
import sys


def _version() -> int:
    """``CNI_COMMAND=VERSION``: answered with nothing but ``cni.version`` (+ json) imported.

    Runtimes call it often; the answer is the same as the skel's (it never fails)."""
    from .cni.version import version_response
    from . import _json as json
    try:
        data = sys.stdin.buffer.read(4 * 1024 * 1024 + 1)   # (cni.skel.MAX_STDIN, not imported here)
    except (OSError, ValueError):
        data = b""
    try:
        sys.stdout.write(json.dumps(version_response(data)) + "\n")
        sys.stdout.flush()
    except OSError:
        return 1
    return 0


_CNI_VARS = ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH", "CNI_ARGS")


def main(argv=None) -> int:
    command = os.environ.get("CNI_COMMAND")
    args = sys.argv[1:] if argv is None else argv
    # A runtime that sets CNI_* but no (or an empty) CNI_COMMAND gets a CNI error
    # (code 4), not the CLI's help text on stdout.
    if command or ("CNI_COMMAND" in os.environ and not args) or (
            not args and any(v in os.environ for v in _CNI_VARS)):
        if command == "VERSION":
            return _version()
        from .plugin import run_plugin
        return run_plugin()
    from .cli.main import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
