"""``cni_ipam._records`` (the exec path's stand-in for ``dataclasses``) against the standard library:
the same class body decorated by each must behave the same -- fields and their order, defaults
and default factories, ``__init__`` binding and its errors, ``__eq__``, ``__repr__``, ``__hash__``,
frozen, slots, ``__post_init__``, inheritance, ``__match_args__``.  The documented differences
(assigning to a frozen field raises ``AttributeError``, not its subclass ``FrozenInstanceError``;
no ``fields``/``asdict``/``replace``) are asserted as such."""
from __future__ import annotations

import dataclasses

import pytest

from cni_ipam import _records


def pair(body, **opts):
    """The class ``body(dataclass, field)`` builds, decorated by each implementation."""
    return (body(_records.dataclass(**opts) if opts else _records.dataclass, _records.field),
            body(dataclasses.dataclass(**opts) if opts else dataclasses.dataclass, dataclasses.field))


def _outcome(fn):
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - the exact error is what is compared
        return ("error", type(e).__name__, str(e))


def plain(dc, field):
    @dc
    class P:
        a: int
        b: str = "x"
        c: list = field(default_factory=list)
        d: tuple = ()
    return P


def frozen_slots(dc, field):
    @dc
    class F:
        a: int
        b: str = "x"
        c: tuple = field(default=(1, 2))
    return F


def with_post_init(dc, field):
    @dc
    class W:
        x: int
        y: int = 2

        def __post_init__(self):
            self.z = self.x + self.y
    return W


def inherited(dc, field):
    @dc
    class Base:
        a: int
        b: int = 1

    @dc
    class Child(Base):
        c: int = 3
        b: int = 5        # a base field redefined: keeps its place, takes the new default
    return Child


CALLS = [((1,), {}), ((1, "y"), {}), ((), {"a": 2, "b": "q"}), ((1,), {"c": [9]}), ((), {}),
         ((1,), {"a": 2}), ((1,), {"zz": 1}), ((1, 2, 3, 4, 5), {})]


@pytest.mark.parametrize("body", [plain, with_post_init, inherited])
def test_same_fields_defaults_init_eq_repr(body):
    ours, std = pair(body)
    names = [f.name for f in dataclasses.fields(std)]
    assert list(ours.__record_fields__) == names
    assert ours.__match_args__ == std.__match_args__
    for args, kw in CALLS:
        if body is with_post_init:
            args, kw = args[:2], {k: v for k, v in kw.items() if k in ("x", "y", "zz")}
        o, s = _outcome(lambda: ours(*args, **kw)), _outcome(lambda: std(*args, **kw))
        assert o[0] == s[0], (args, kw, o, s)
        if o[0] == "error":   # the same error (ours names __init__ without the class's qualname)
            assert o[1] == s[1] and s[2].endswith(o[2]), (args, kw, o, s)
            continue
        a, b = o[1], s[1]
        assert vars(a) == vars(b)
        assert repr(a) == repr(b).replace(std.__qualname__, ours.__qualname__)
        assert (a == ours(*args, **kw)) and (b == std(*args, **kw))
        assert a != b      # another class: not equal (NotImplemented both ways)
    assert ours.__hash__ is None and std.__hash__ is None   # eq without frozen: unhashable
    if body is plain:
        assert ours(1).c is not ours(1).c and std(1).c is not std(1).c   # a fresh list each time


def test_frozen_and_slots():
    ours, std = pair(frozen_slots, frozen=True, slots=True)
    a, b = ours(1), std(1)
    assert repr(a) == repr(b).replace(std.__qualname__, ours.__qualname__)
    assert hash(a) == hash(ours(1)) and hash(b) == hash(std(1))
    assert hash(a) == hash((1, "x", (1, 2)))   # the tuple of the fields, as dataclasses hashes
    assert hash(b) == hash((1, "x", (1, 2)))
    assert ours.__slots__ == std.__slots__ == ("a", "b", "c")
    for obj in (a, b):
        assert not hasattr(obj, "__dict__")
        with pytest.raises(AttributeError):
            obj.a = 2
        with pytest.raises(AttributeError):
            del obj.a
    with pytest.raises(AttributeError):
        a.other = 1    # (the standard one raises TypeError here on 3.11: a CPython bug with slots)
    # the documented difference: ours raises AttributeError itself, not FrozenInstanceError
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.a = 2
    with pytest.raises(AttributeError) as ei:
        a.a = 2
    assert type(ei.value) is AttributeError


def test_eq_false_and_repr_false():
    ours, std = pair(plain, eq=False, repr=False)
    assert ours(1) != ours(1) and std(1) != std(1)          # identity
    assert ours.__hash__ is object.__hash__ and std.__hash__ is object.__hash__
    assert repr(ours(1)).startswith("<") and repr(std(1)).startswith("<")


def test_own_methods_win_except_eq():
    def body(dc, field):
        @dc
        class R:
            a: int

            def __repr__(self):
                return "mine"
        return R
    ours, std = pair(body)
    assert repr(ours(1)) == repr(std(1)) == "mine"


def test_the_project_records_are_typed_as_dataclasses_for_type_checkers():
    """Type checkers see ``dataclasses`` (the TYPE_CHECKING branch); at run time the stand-in
    is used (exec-path start-up)."""
    import ast
    import inspect
    src = inspect.getsource(_records)
    tree = ast.parse(src)
    guarded = [n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"]
    assert guarded, "no TYPE_CHECKING branch in _records"
    imp = guarded[-1].body[0]
    assert isinstance(imp, ast.ImportFrom) and imp.module == "dataclasses"
    assert {a.name for a in imp.names} == {"dataclass", "field"}
    assert _records.dataclass is _records._dataclass and _records.field is _records._field
