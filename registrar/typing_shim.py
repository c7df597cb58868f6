"""What the modules a sidecar imports take from `typing`, without importing it.

Importing `typing` costs ~2 ms, and each field of a `typing.NamedTuple` record has its
annotation compiled into a ForwardRef (a sidecar defines 43 records, 207 fields: ~3 ms), of a
start whose budget is 60 ms (README, "Why no gRPC and no Docker SDK"). mypy reads `typing`'s
own names here (it takes any `TYPE_CHECKING` for true); at run time:
- `NamedTuple`: a base whose subclasses are made `collections.namedtuple` types with the class
  body's defaults, methods, properties and docstring, which is what `typing.NamedTuple` makes,
  less the evaluated annotations (registrar never reads them);
- `Protocol`: `object` (the protocols are mypy's; nothing checks them at run time);
- `Any`, `NoReturn`: placeholders, for the rare annotation evaluated at run time;
- `TypeVar`: returns its name (type variables are for annotations, which are strings here).
A layers test checks that a sidecar's start imports no `typing`.
"""

from __future__ import annotations

TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any as Any
    from typing import NamedTuple as NamedTuple
    from typing import NoReturn as NoReturn
    from typing import Protocol as Protocol
    from typing import TypeVar as TypeVar
else:
    from collections import namedtuple

    Any = NoReturn = object
    Protocol = object

    def TypeVar(name, *constraints, **options):
        return name

    _MADE_BY_NAMEDTUPLE = frozenset({
        "__module__", "__qualname__", "__annotations__", "__slots__", "__dict__",
        "__weakref__", "__orig_bases__",
    })

    class _Records(type):
        def __new__(mcls, name, bases, namespace):
            if namespace.get("_shim_base"):
                return super().__new__(mcls, name, bases, namespace)
            fields = list(namespace.get("__annotations__", {}))
            defaults = [namespace[field] for field in fields if field in namespace]
            record = namedtuple(name, fields, defaults=defaults,
                                module=namespace.get("__module__"))
            record.__qualname__ = namespace.get("__qualname__", name)
            record.__annotations__ = dict(namespace.get("__annotations__", {}))
            for key, value in namespace.items():
                if key not in _MADE_BY_NAMEDTUPLE and key not in fields:
                    setattr(record, key, value)
            return record

    class NamedTuple(metaclass=_Records):
        _shim_base = True
