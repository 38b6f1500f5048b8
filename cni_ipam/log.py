"""The plugin's logger: a log file (created 0600) and stderr -- never stdout.

Not the standard ``logging`` package: importing it costs ~15 ms per exec (it pulls
in traceback, tokenize, threading, string, weakref, ...), about a quarter of an
ADD, and every pod start execs the plugin.  This does what the plugin needs:
levels, %-formatting, a tag, tracebacks on ``exception``.
"""
import os
import sys
import time

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR}
_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR"}
_OFF = 100


class Logger:
    def __init__(self):
        self.level = _OFF            # the file's level (no file: off)
        self.stderr_level = WARNING
        self.tag = ""
        self._file = None
        # lines logged before the first ``configure`` (e.g. while the config that names the log
        # file is parsed): written to the file once it is open
        self._pending: list | None = []

    def configure(self, log_file: str | None, level: str = "info", tag: str = "") -> None:
        """Log to ``log_file`` at ``level`` (and warnings and errors to stderr)."""
        self.close()
        self.tag = f" {tag}" if tag else ""
        self.level = LEVELS.get(level.lower(), INFO)
        if log_file:
            try:
                os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
                fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                self._file = os.fdopen(fd, "a", buffering=1)
            except OSError as e:
                self.level = _OFF
                self.warning("cannot open log file %s: %s", log_file, e.strerror)
        pending, self._pending = self._pending, None
        if pending and self._file is not None:
            for level, line in pending:
                if level >= self.level:
                    try:
                        self._file.write(line)
                    except (OSError, ValueError):
                        break

    def close(self) -> None:
        f, self._file = self._file, None
        self.level = _OFF
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 (the logging package's name)
        return level >= self.level or level >= self.stderr_level or (
            self._pending is not None and level >= INFO)

    def _log(self, level: int, msg, args, exc: bool = False) -> None:
        if not self.isEnabledFor(level):
            return
        try:
            text = msg % args if args else str(msg)
        except (TypeError, ValueError):
            text = f"{msg} {args!r}"
        now = time.time()
        line = "%s,%03d %s [%d]%s %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
                                           int(now * 1000) % 1000, _NAMES[level], os.getpid(), self.tag, text)
        if exc and sys.exc_info()[0] is not None:
            import traceback
            line += traceback.format_exc()
        if self._file is not None and level >= self.level:
            try:
                self._file.write(line)
            except (OSError, ValueError):
                pass
        elif self._pending is not None and level >= INFO and len(self._pending) < 100:
            self._pending.append((level, line))
        if level >= self.stderr_level:
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError, AttributeError):
                pass

    def debug(self, msg, *args):
        self._log(DEBUG, msg, args)

    def info(self, msg, *args):
        self._log(INFO, msg, args)

    def warning(self, msg, *args):
        self._log(WARNING, msg, args)

    def error(self, msg, *args):
        self._log(ERROR, msg, args)

    def exception(self, msg, *args):
        self._log(ERROR, msg, args, exc=True)


#: the one logger of the package
log = Logger()
