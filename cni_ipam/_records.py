"""A small stand-in for ``dataclasses.dataclass`` on the plugin's exec path.

``dataclasses`` imports ``inspect`` (and with it ``ast``, ``dis``, ``tokenize``,
``linecache``) and compiles 4-6 generated methods per class at import; with the ~18
``@dataclass`` classes on the exec path that was about a quarter of every ADD/DEL exec
(callgrind: 266 M -> 189 M instructions with this and no run-time ``typing``).  This
covers the subset cni_ipam uses -- ``field(default=..., default_factory=...)``,
``frozen``, ``slots``, ``eq``, ``repr``, ``__post_init__``, inheritance of fields -- and
compiles ONE small source per class.  Differences from ``dataclasses``: assigning to a
frozen field raises ``AttributeError`` (not its subclass ``FrozenInstanceError``); no
``fields``/``asdict``/``replace``.
"""
_MISSING = object()


class Field:
    __slots__ = ("default", "default_factory")

    def __init__(self, default, default_factory):
        self.default, self.default_factory = default, default_factory


def field(*, default=_MISSING, default_factory=_MISSING):
    return Field(default, default_factory)


def dataclass(cls=None, /, *, frozen=False, slots=False, eq=True, repr=True):
    def wrap(cls):
        names = []
        for base in reversed(cls.__mro__[1:]):
            names += [n for n in getattr(base, "__record_fields__", ()) if n not in names]
        own = [n for n in cls.__dict__.get("__annotations__", {}) if n not in names]
        names += own
        defaults = dict(getattr(cls, "__record_defaults__", {}))
        for n in own:
            v = cls.__dict__.get(n, _MISSING)
            if isinstance(v, Field):
                defaults[n] = v
                delattr(cls, n)
            elif v is not _MISSING:
                defaults[n] = Field(v, _MISSING)
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
        if hasattr(cls, "__post_init__"):
            body.append("self.__post_init__()")
        src = f"def __init__(self, {', '.join(args)}):\n " + "\n ".join(body or ["pass"]) + "\n"
        tup = "(" + "".join(f"self.{n}," for n in names) + ")"
        tupo = "(" + "".join(f"other.{n}," for n in names) + ")"
        src += f"def __eq__(self, other):\n if other.__class__ is self.__class__: return {tup} == {tupo}\n return NotImplemented\n"
        src += f"def __repr__(self):\n return self.__class__.__qualname__ + '(' + ', '.join(f'{{n}}={{getattr(self, n)!r}}' for n in {tuple(names)!r}) + ')'\n"
        if frozen:
            src += f"def __hash__(self):\n return hash({tup})\n"
            src += "def __setattr__(self, name, value):\n raise AttributeError(f'cannot assign to field {name!r}')\n"
            src += "def __delattr__(self, name):\n raise AttributeError(f'cannot delete field {name!r}')\n"
        ns = {}
        exec(src, g, ns)
        d = dict(cls.__dict__)
        for k, v in ns.items():
            if k == "__repr__" and not repr:
                continue
            if k in ("__eq__", "__hash__") and not eq:
                continue
            if k not in cls.__dict__ or k in ("__eq__", "__hash__"):
                d[k] = v
        if not frozen and eq:
            d["__hash__"] = None
        d["__record_fields__"] = tuple(names)
        d["__record_defaults__"] = defaults
        d["__match_args__"] = tuple(names)
        if not slots:
            for k, v in d.items():
                if k not in ("__dict__", "__weakref__"):
                    try:
                        setattr(cls, k, v)
                    except (AttributeError, TypeError):
                        pass
            return cls
        d["__slots__"] = tuple(own)
        for n in own:
            d.pop(n, None)
        d.pop("__dict__", None)
        d.pop("__weakref__", None)
        new = type(cls)(cls.__name__, cls.__bases__, d)
        new.__qualname__ = cls.__qualname__
        return new
    return wrap if cls is None else wrap(cls)
