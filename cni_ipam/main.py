"""One program: the CNI plugin when CNI_COMMAND is set, the admin CLI otherwise."""
import os
import sys


def _version() -> int:
    """``CNI_COMMAND=VERSION``: answered with nothing but ``cni.version`` (+ json) imported.

    Runtimes call it often; the answer is the same as the skel's (it never fails)."""
    from .cni.version import version_response
    import json
    try:
        data = sys.stdin.buffer.read()
    except (OSError, ValueError):
        data = b""
    try:
        sys.stdout.write(json.dumps(version_response(data)) + "\n")
        sys.stdout.flush()
    except OSError:
        return 1
    return 0


def main(argv=None) -> int:
    command = os.environ.get("CNI_COMMAND")
    if command:
        if command == "VERSION":
            return _version()
        from .plugin import run_plugin
        return run_plugin()
    from .cli.main import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
