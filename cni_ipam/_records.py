"""A small stand-in for ``dataclasses.dataclass`` on the plugin's exec path.

``dataclasses`` imports ``inspect`` (and with it ``ast``, ``dis``, ``tokenize``,
``linecache``) and compiles 4-6 generated methods per class at import; with the ~18
``@dataclass`` classes on the exec path that was about a quarter of every ADD/DEL exec
(callgrind: 266 M -> 189 M instructions with this and no run-time ``typing``).  This
covers the subset cni_ipam uses -- ``field(default=..., default_factory=...)``,
``frozen``, ``slots``, ``eq``, ``repr``, ``__post_init__``, inheritance of fields.  The methods
are generic closures over the field names: nothing is compiled when a class is defined (compiling
one source per class was ~0.5 ms a class, ~10 ms of every exec -- issue 17).  A call of
``__init__`` whose arguments do not bind (missing, unexpected or repeated) compiles the exact
``dataclasses``-style ``__init__`` then and calls it, so the ``TypeError`` is the usual one.  Differences from ``dataclasses``: assigning to a
frozen field raises ``AttributeError`` (not its subclass ``FrozenInstanceError``); no
``fields``/``asdict``/``replace``.

Type checkers see the standard library's ``dataclass`` and ``field`` (the ``TYPE_CHECKING``
branch at the end): the classes are typed as dataclasses, which is what they behave as
(tests/test_records.py compares the two).
"""
_MISSING = object()
TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)


class Field:
    __slots__ = ("default", "default_factory")

    def __init__(self, default, default_factory):
        self.default, self.default_factory = default, default_factory


def _field(*, default=_MISSING, default_factory=_MISSING):
    return Field(default, default_factory)


def _dataclass(cls=None, /, *, frozen=False, slots=False, eq=True, repr=True):
    def wrap(cls):
        names = []
        for base in reversed(cls.__mro__[1:]):
            names += [n for n in getattr(base, "__record_fields__", ()) if n not in names]
        annotated = list(cls.__dict__.get("__annotations__", {}))
        own = [n for n in annotated if n not in names]
        names += own
        defaults = dict(getattr(cls, "__record_defaults__", {}))
        for n in annotated:   # new fields, and inherited ones redefined here (their place stays)
            v = cls.__dict__.get(n, _MISSING)
            if isinstance(v, Field):
                defaults[n] = v
                delattr(cls, n)
            elif v is not _MISSING:
                defaults[n] = Field(v, _MISSING)
            else:
                defaults.pop(n, None)
        ns = _methods(names, defaults, frozen, hasattr(cls, "__post_init__"))
        own_dict = cls.__dict__
        new: dict = {}   # what the class gains (setting only these: each set on a type costs)
        for k, v in ns.items():
            if k == "__repr__" and not repr:
                continue
            if k in ("__eq__", "__hash__") and not eq:
                continue
            if k not in own_dict or k in ("__eq__", "__hash__"):
                new[k] = v
        if not frozen and eq:
            new["__hash__"] = None
        new["__record_fields__"] = tuple(names)
        new["__record_defaults__"] = defaults
        new["__match_args__"] = tuple(names)
        if not slots:
            for k, v in new.items():
                setattr(cls, k, v)
            return cls
        d = dict(own_dict)
        d.update(new)
        d["__slots__"] = tuple(own)
        for n in annotated:
            d.pop(n, None)
        d.pop("__dict__", None)
        d.pop("__weakref__", None)
        new = type(cls)(cls.__name__, cls.__bases__, d)
        new.__qualname__ = cls.__qualname__
        return new
    return wrap if cls is None else wrap(cls)


def _exact_init(names, defaults, frozen, post_init):
    """The ``__init__`` ``dataclasses`` would write (compiled: only for argument errors)."""
    g = {"_setattr": object.__setattr__, "_d": defaults, "_M": _MISSING}
    args, body = [], []
    for n in names:
        f = defaults.get(n)
        if f is None:
            args.append(n)
        elif f.default_factory is not _MISSING:
            args.append(f"{n}=_M")
        else:
            args.append(f"{n}=_d[{n!r}].default")
        val = n if (f is None or f.default_factory is _MISSING) else f"_d[{n!r}].default_factory() if {n} is _M else {n}"
        body.append(f"_setattr(self, {n!r}, {val})" if frozen else f"self.{n} = {val}")
    if post_init:
        body.append("self.__post_init__()")
    ns = {}
    exec(f"def __init__(self, {', '.join(args)}):\n " + "\n ".join(body or ["pass"]) + "\n", g, ns)
    return ns["__init__"]


def _frozen_setattr(self, name, value):
    raise AttributeError(f"cannot assign to field {name!r}")


def _frozen_delattr(self, name):
    raise AttributeError(f"cannot delete field {name!r}")


_frozen_setattr.__name__ = _frozen_setattr.__qualname__ = "__setattr__"
_frozen_delattr.__name__ = _frozen_delattr.__qualname__ = "__delattr__"


def _methods(names, defaults, frozen, post_init) -> dict:
    """``__init__``, ``__eq__``, ``__repr__`` (+ ``__hash__``, ``__setattr__``, ``__delattr__``
    when frozen) for the fields ``names``, as closures."""
    names = tuple(names)
    count = len(names)
    # per field: (name, default or _MISSING, default_factory or _MISSING); required: both _MISSING
    specs = tuple((n, defaults[n].default if n in defaults else _MISSING,
                   defaults[n].default_factory if n in defaults else _MISSING) for n in names)
    setter = object.__setattr__ if frozen else setattr
    exact: list = []

    def __init__(self, *args, **kw):
        if len(args) <= count:
            values = list(args)
            used = 0
            for n, default, factory in specs[len(args):]:
                if n in kw:
                    values.append(kw[n])
                    used += 1
                elif factory is not _MISSING:
                    values.append(factory())
                elif default is not _MISSING:
                    values.append(default)
                else:
                    break
            else:
                if used == len(kw):
                    for n, v in zip(names, values):
                        setter(self, n, v)
                    if post_init:
                        self.__post_init__()
                    return
        # the arguments do not bind: let the exact __init__ raise the usual TypeError
        if not exact:
            exact.append(_exact_init(names, defaults, frozen, post_init))
        exact[0](self, *args, **kw)

    def __eq__(self, other):
        if other.__class__ is self.__class__:
            return tuple([getattr(self, n) for n in names]) == tuple([getattr(other, n) for n in names])
        return NotImplemented

    def __repr__(self):
        return self.__class__.__qualname__ + '(' + ', '.join(f'{n}={getattr(self, n)!r}' for n in names) + ')'

    out = {"__init__": __init__, "__eq__": __eq__, "__repr__": __repr__}
    if frozen:
        def __hash__(self):
            return hash(tuple([getattr(self, n) for n in names]))
        out.update(__hash__=__hash__, __setattr__=_frozen_setattr, __delattr__=_frozen_delattr)
    for k, f in out.items():
        f.__qualname__ = k
    return out


if TYPE_CHECKING:  # pragma: no cover
    from dataclasses import dataclass, field
else:
    dataclass, field = _dataclass, _field
