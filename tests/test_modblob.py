"""The plugin bundle's module blob (packaging/modblob.py) and the finder packaging/pyi_boot.py
serves it with: what goes in, that imports come from it with the attributes the path finder
gives, that what is not in it still imports, and that a foreign blob is ignored."""
from __future__ import annotations

import json
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "packaging"))
import modblob  # noqa: E402

SOURCES = {
    "pkg/__init__.py": "WHERE = 'pkg'\n",
    "pkg/a.py": "WHERE = 'loose a'\n",
    "pkg/sub/__init__.py": "",
    "pkg/sub/b.py": "from .. import a\nWHERE = 'b with ' + a.WHERE\n",
    "pkg/cold/__init__.py": "",
    "pkg/cold/c.py": "WHERE = 'cold c'\n",
    "top.py": "import pkg.sub.b\nWHERE = 'top'\n",
    "other.py": "WHERE = 'other'\n",
}


def _internal(tmp_path: Path) -> Path:
    """A bundle's ``_internal/`` as PyInstaller's noarchive onedir lays it out: loose .pyc files."""
    internal = tmp_path / "_internal"
    for rel, text in SOURCES.items():
        src = tmp_path / "src" / rel
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text(text)
        pyc = internal / (rel[:-3] + ".pyc")
        pyc.parent.mkdir(parents=True, exist_ok=True)
        py_compile.compile(str(src), cfile=str(pyc), dfile=rel, doraise=True)
    return internal


def test_the_blob_holds_the_packages_and_modules_asked_for(tmp_path):
    internal = _internal(tmp_path)
    path, n, size = modblob.write(str(internal), ("pkg",), exclude=("pkg.cold",), modules=("top",),
                                  groups=(("pkg", "pkg.sub.b", "top"),))
    index = modblob.read_index(path)
    assert sorted(index) == ["pkg", "pkg.a", "pkg.sub", "pkg.sub.b", "top"] and n == 5
    assert index["pkg"][0] and index["pkg.sub"][0] and not index["pkg.a"][0]
    assert index["pkg.sub"][4] == "pkg/sub/__init__.pyc" and index["top"][4] == "top.pyc"
    # a group is one chunk (the modules at their places in it); the others are chunks of their own
    assert {index[m][1:3] for m in ("pkg", "pkg.sub.b", "top")} == {index["pkg"][1:3]}
    assert [index[m][3] for m in ("pkg", "pkg.sub.b", "top")] == [0, 1, 2]
    assert len({index[m][1] for m in index}) == 3 and index["pkg.a"][3] == 0
    assert size == Path(path).stat().st_size
    with pytest.raises(SystemExit, match="nothing to write"):
        modblob.write(str(internal), ("pkg",), modules=("no_such_module",))
    with pytest.raises(SystemExit, match="groups name modules"):
        modblob.write(str(internal), ("pkg",), groups=(("pkg.a", "pkg.gone"),))


def _run_boot(internal: Path, code: str) -> dict:
    """packaging/pyi_boot.py as the bootloader runs it (``__main__``, ``sys._MEIPASS`` set, the
    bundle dir on sys.path), then ``code``, which leaves a dict in ``out``."""
    prog = (f"import sys, json\nsys._MEIPASS = {str(internal)!r}\nsys.path.insert(0, sys._MEIPASS)\n"
            f"exec(compile(open({str(ROOT / 'packaging' / 'pyi_boot.py')!r}).read(), 'pyi_boot', 'exec'),"
            f" {{'__name__': '__main__'}})\nout = {{}}\n{code}\nprint(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-S", "-c", prog], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


PROBE = """
import top, pkg.cold.c, other
m = sys.modules
out["where"] = {n: m[n].WHERE for n in ("pkg.a", "pkg.sub.b", "top", "pkg.cold.c", "other")}
out["loader"] = {n: type(m[n].__spec__.loader).__name__ if not isinstance(m[n].__spec__.loader, type)
                 else m[n].__spec__.loader.__name__ for n in ("pkg", "pkg.a", "top", "pkg.cold.c", "other")}
out["file"] = {n: m[n].__file__ for n in ("pkg", "pkg.sub", "pkg.a", "top")}
out["path"] = {n: m[n].__path__ for n in ("pkg", "pkg.sub")}
out["cached"] = m["pkg.a"].__cached__
"""


@pytest.mark.parametrize("groups", [(), (("pkg", "pkg.sub.b", "top"), ("pkg.a",))])
def test_imports_come_from_the_blob_with_the_path_finders_attributes(tmp_path, groups):
    internal = _internal(tmp_path)
    modblob.write(str(internal), ("pkg",), exclude=("pkg.cold",), modules=("top",), groups=groups)
    # the blob is what is imported: the loose file changed afterwards is not read
    (tmp_path / "src" / "pkg" / "a.py").write_text("WHERE = 'changed loose a'\n")
    py_compile.compile(str(tmp_path / "src" / "pkg" / "a.py"), cfile=str(internal / "pkg" / "a.pyc"), doraise=True)
    out = _run_boot(internal, PROBE)
    assert out["where"] == {"pkg.a": "loose a", "pkg.sub.b": "b with loose a", "top": "top",
                            "pkg.cold.c": "cold c", "other": "other"}
    assert out["loader"] == {"pkg": "BlobFinder", "pkg.a": "BlobFinder", "top": "BlobFinder",
                             "pkg.cold.c": "SourcelessFileLoader", "other": "SourcelessFileLoader"}
    i = str(internal)
    assert out["file"] == {"pkg": f"{i}/pkg/__init__.pyc", "pkg.sub": f"{i}/pkg/sub/__init__.pyc",
                           "pkg.a": f"{i}/pkg/a.pyc", "top": f"{i}/top.pyc"}
    assert out["path"] == {"pkg": [f"{i}/pkg"], "pkg.sub": [f"{i}/pkg/sub"]}
    assert out["cached"] == f"{i}/pkg/a.pyc"


@pytest.mark.parametrize("damage", ["magic", "missing"])
def test_without_a_usable_blob_the_path_finder_imports_everything(tmp_path, damage):
    internal = _internal(tmp_path)
    path = Path(modblob.write(str(internal), ("pkg",), modules=("top",))[0])
    if damage == "magic":   # a blob written by another Python
        data = bytearray(path.read_bytes())
        data[4] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    out = _run_boot(internal, PROBE)
    assert set(out["loader"].values()) == {"SourcelessFileLoader"}
    assert out["where"]["pkg.sub.b"] == "b with loose a"
