"""One program: the CNI plugin when CNI_COMMAND is set, the admin CLI otherwise."""
import os
import sys


def main(argv=None) -> int:
    if os.environ.get("CNI_COMMAND"):
        from .plugin import run_plugin
        return run_plugin()
    from .cli.main import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
