"""The bootstrap script of the plugin bundle, in place of PyInstaller's ``pyiboot01_bootstrap``.

packaging/cni-ipam.spec puts it into the onedir plugin bundle (and the hello-world bundle, the floor)
instead of PyInstaller's bootstrap, whose modules cost 5.8 M instructions on every exec, 8.5 M on
an ADD (docs/performance.md, "The bundle's floor"): ``struct`` (+ the ``_struct`` extension),
``pyimod01_archive`` (+ ``zlib``: a PYZ archive reader), ``pyimod02_importers`` (a Python-level
finder that every import then goes through), ``pyimod03_ctypes`` (a failed ``import ctypes``).
That bundle has nothing for them to do: its modules are loose ``.pyc`` files under ``_internal/``
that Python's own path finder loads (its PYZ archive is empty, the spec checks), and neither
ctypes nor an .egg is in it.  What the standard bootstrap does that still applies is done here.  Its interface
with the bootloader (PyInstaller 6: ``sys._MEIPASS``, ``sys._pyinstaller_pyz``, scripts run in
``__main__``) is all this uses.  The controller bundle keeps PyInstaller's own bootstrap.

It also puts a finder first on ``sys.meta_path`` that imports the modules of the bundle's module
blob (``_internal/modules.blob``, packaging/modblob.py) from it: ~0.11 M instructions an import
instead of the path finder's ~0.30 M.  Without a blob (or one of another Python) nothing changes.
"""


def _pyi_lean_bootstrap():
    import sys
    import _imp
    import os

    sys.frozen = True
    # The bootloader's pointer to the (empty) PYZ archive; PyInstaller's bootstrap removes it too.
    sys.__dict__.pop("_pyinstaller_pyz", None)

    # As PyInstaller's bootstrap: a frozen program ignores the virtualenv it is started from.
    if "VIRTUAL_ENV" in os.environ:
        os.environ["VIRTUAL_ENV"] = ""
        del os.environ["VIRTUAL_ENV"]
    if sys.warnoptions:  # as the interpreter does for -W
        import warnings  # noqa: F401

    # As PyInstaller's bootstrap (python >= 3.11, its _fixup_frozen_stdlib): the stdlib modules
    # frozen into the interpreter get a __file__ (.pyc) under sys._MEIPASS, as in every PyInstaller
    # program; with sys._stdlib_dir set, Python gives one (.py) to those imported later.
    meipass = sys._MEIPASS
    if not sys._stdlib_dir:
        sys._stdlib_dir = meipass
    for name, module in list(sys.modules.items()):
        if not _imp.is_frozen(name):
            continue
        state = module.__spec__.loader_state
        orig = state.origname + (".__init__" if _imp.is_frozen_package(name) else "")
        filename = meipass + "/" + orig.replace(".", "/") + ".pyc"
        if not hasattr(module, "__file__"):
            try:
                module.__file__ = filename
            except AttributeError:
                pass
        if state.filename is None and orig != "importlib._bootstrap":
            state.filename = filename

    # The module blob (packaging/modblob.py): the code of the modules a CNI exec imports, in
    # groups each read with one pread and served by the finder below; the rest go to the path finder.
    import marshal
    try:
        fd = os.open(meipass + "/modules.blob", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    if fd < 3:   # started with fd 0, 1 or 2 closed: the blob must not take a std stream's number
        low = []  # (the exec server's children dup2 an exec's stdin/stdout/stderr onto 0-2)
        while fd < 3:
            low.append(fd)
            fd = os.dup(fd)     # (not inheritable)
        for f in low:
            os.close(f)
    try:
        head = os.pread(fd, 12, 0)
        if head[:8] != b"CNIB" + sys.modules["_frozen_importlib_external"].MAGIC_NUMBER:
            raise ValueError("not a module blob of this Python")
        n = int.from_bytes(head[8:12], "little")
        index = marshal.loads(os.pread(fd, n, 12))
    except (OSError, ValueError, EOFError, TypeError):
        os.close(fd)
        return
    base = 12 + n
    spec_of = sys.modules["_frozen_importlib"].ModuleSpec

    groups = {}   # offset -> the group's code objects, once loaded

    class BlobFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            entry = index.get(name)
            if entry is None:
                return None
            spec = spec_of(name, BlobFinder, origin=meipass + "/" + entry[4], is_package=entry[0])
            spec.has_location = True   # (__file__: the loose .pyc's path, as the path finder gives)
            if entry[0]:
                spec.submodule_search_locations.append(meipass + "/" + entry[4].rpartition("/")[0])
            return spec

        @staticmethod
        def create_module(spec):
            return None

        @staticmethod
        def exec_module(module):
            _, offset, length, position, _ = index[module.__spec__.name]
            codes = groups.get(offset)
            if codes is None:   # the module's whole group, in one unmarshalling
                codes = groups[offset] = marshal.loads(os.pread(fd, length, base + offset))
            exec(codes[position], module.__dict__)

    sys.meta_path.insert(0, BlobFinder)

_pyi_lean_bootstrap()
del _pyi_lean_bootstrap
