"""The option schema's fields as forms, flags, pages and docs read them: each field's kind,
choices and bounds, a form's text parsed into values, a validation error worded for a
person (the API's 422s, the command line's one-line errors), and the docs' table.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar, get_args

from annotated_types import Ge, Le
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from shared.errors import OptionError
from shared.options import SUBMISSION_FIELDS, Submission

M = TypeVar("M", bound=BaseModel)


@functools.cache
def field_kind(name: str, model: type[BaseModel] = Submission) -> str:
    """``bool``, ``int``, ``float``, ``choice``, ``names``, ``numbers`` or ``text``: how a
    form, a flag or a page reads and shows the field ``name``."""
    hint = model.model_fields[name].annotation
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is Literal:
        return "choice"
    if typing.get_origin(hint) is tuple:
        item = get_args(hint)[0]
        if typing.get_origin(item) is Annotated:
            item = get_args(item)[0]
        return "names" if item is str else "numbers"
    return {bool: "bool", int: "int", float: "float"}.get(hint, "text")  # type: ignore[arg-type]


def choices(name: str, model: type[BaseModel] = Submission) -> tuple[str, ...]:
    return tuple(get_args(model.model_fields[name].annotation))


def bounds(name: str, model: type[BaseModel] = Submission) -> tuple[float, float]:
    """(low, high) of a number field, or of a list field's items."""
    info: FieldInfo = model.model_fields[name]
    metadata = list(info.metadata)
    for arg in get_args(info.annotation):  # a list's items: tuple[Annotated[float, ...], ...]
        for item in get_args(arg):
            for field in getattr(item, "__metadata__", ()):  # Annotated[float, Field(...)]
                metadata += getattr(field, "metadata", [])
    low = next((m.ge for m in metadata if isinstance(m, Ge)), -math.inf)
    high = next((m.le for m in metadata if isinstance(m, Le)), math.inf)
    return float(low), float(high)


def _message(
    error: Mapping[str, Any],
    field: str | None,
    model: type[BaseModel],
    limits: Mapping[str, tuple[float, float]],
) -> str:
    kind, value = error["type"], error.get("input")
    if field in model.model_fields and kind in ("greater_than_equal", "less_than_equal"):
        low, high = limits.get(field) or bounds(field, model)
        return f"must be between {low:g} and {high:g}, not {value!r}"
    if kind == "literal_error":
        return f"must be one of {', '.join(choices(str(field), model))}; got {value!r}"
    if kind == "int_from_float":
        return f"must be a whole number, not {value!r}"
    if kind in ("int_parsing", "float_parsing", "int_type", "float_type", "finite_number"):
        return f"must be a number, not {value!r}"
    if kind in ("too_short", "tuple_type") and field in ("content_layers", "style_layers"):
        return "give a list of one or more layer names"
    if kind == "extra_forbidden":
        return f"unknown field {field!r}"
    if kind == "bool_type":
        return "must be true or false"
    if kind == "value_error" and isinstance(error.get("ctx", {}).get("error"), ValueError):
        return "must be true or false"
    return str(error["msg"])


def validate(
    model: type[M],
    values: Mapping[str, Any],
    limits: Mapping[str, tuple[float, float]] | None = None,
) -> M:
    """``values`` as ``model``, or the first problem as an :class:`OptionError`.
    ``limits``: narrower ranges the caller enforces (a service's ``size``), for the
    message of a value outside both."""
    for name, value in values.items():
        numeric = name in model.model_fields and field_kind(name, model) in ("int", "float")
        if isinstance(value, bool) and numeric:  # pydantic's lax mode reads True as 1
            raise OptionError(f"must be a number, not {value!r}", field=name)
    try:
        return model.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else None
        raise OptionError(_message(first, field, model, limits or {}), field=field) from None


def form_text(value: Any) -> str:
    """A value as a form (or a flag) writes it: lists comma-separated, booleans as
    ``true``/``false``, nothing for None; what :func:`form_values` reads back."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(part) for part in value)
    return str(value)


def form_values(form: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """A multipart or urlencoded form (every value of every field) as :class:`Submission`
    takes it: a list field from all its values, any other from its last; a field left
    empty takes its default."""
    values: dict[str, Any] = {}
    for name, given in form.items():
        if not any(value.strip() for value in given):
            continue
        kind = field_kind(name) if name in SUBMISSION_FIELDS else "text"
        if kind in ("names", "numbers"):
            values[name] = list(given)
        elif kind in ("int", "float"):
            values[name] = _number_text(given[-1], int if kind == "int" else float)
        else:
            values[name] = given[-1]
    return values


def _number_text(text: str, kind: type) -> Any:
    """A number field's text as that number, so that an error quotes the number; text
    that is none ("auto", "abc") as it is, for the schema to judge."""
    for read in (kind, float):  # 12.5 for an int: "must be a whole number, not 12.5"
        try:
            return read(text.strip())
        except ValueError:
            continue
    return text


def options_reference() -> list[str]:
    """The Markdown table of every submission field: name, type, default, range or choices,
    and help (docs/api.md is made from it; a test keeps them equal)."""
    rows = ["| field | type | default | range or choices | what it does |", "|---|---|---|---|---|"]
    for name in SUBMISSION_FIELDS:
        info = Submission.model_fields[name]
        kind = field_kind(name)
        if kind == "choice":
            limits = ", ".join(f"`{choice}`" for choice in choices(name))
        elif kind in ("int", "float", "numbers"):
            low, high = bounds(name)
            number = "{:.0f}" if kind == "int" else "{:g}"
            limits = f"{number.format(low)} – {number.format(high)}" if math.isfinite(high) else ""
        else:
            limits = ""
        shown = form_text(info.default)
        unit = (info.json_schema_extra or {}).get("x-unit")  # type: ignore[union-attr]
        shown = f"{shown} {unit}" if shown and unit else shown
        kind_text = {"names": "list of names", "numbers": "list of numbers"}.get(kind, kind)
        rows.append(f"| `{name}` | {kind_text} | {shown} | {limits} | {info.description or ''} |")
    return rows


if __name__ == "__main__":
    # python -m shared.fields docs/api.md: rewrite the file's table of the options.
    import sys
    from pathlib import Path

    from shared.config import rewrite_marked

    rewrite_marked(Path(sys.argv[1]), "options", options_reference())
