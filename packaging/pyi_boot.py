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

_pyi_lean_bootstrap()
del _pyi_lean_bootstrap
