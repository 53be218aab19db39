"""Building blocks of the result files' schemas (pydantic models) and the one function that checks a file against
its schema, :func:`validate`.

Each result type declares the pydantic model of its JSON file next to its ``from_dict``
(:attr:`patchlab.results.Result.schema`); :meth:`~patchlab.results.Result.load` and
:func:`~patchlab.results.load_result` validate a file against it before building anything, so a wrong type,
a NaN where a number must be finite, a table whose rows and columns disagree or a free-form field nested too deeply
is refused with a :class:`~patchlab.errors.PatchlabValueError` naming the file and the first bad field, instead of
an ``IndexError`` or a silently wrong number later.

Conventions: models are strict (no coercion: ``"1"`` is not a number, ``true`` is not an integer; an integer is
accepted where a float is expected) and refuse unknown fields; floats are finite unless a field says otherwise
(:data:`AnyFloat`); integers fit 64 bits (:data:`Int64`); free-form fields (settings, provenance, a probe's
details) are any JSON of finite numbers nested at most :data:`MAX_DEPTH` levels (:data:`FreeJson`).
"""

from __future__ import annotations

import math
import os
import reprlib
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from patchlab.errors import PatchlabValueError

M = TypeVar("M", bound=BaseModel)

#: Deepest nesting of lists and objects a free-form field may hold (deeper JSON is not a patchlab file, and
#: recursive code reading it could exhaust the stack).
MAX_DEPTH = 100
_INT64 = 2**63

#: An integer of 64 bits (a JSON file may hold integers of thousands of digits).
Int64 = Annotated[int, Field(ge=-_INT64, lt=_INT64)]
#: A non-negative 64-bit integer (a count, an index).
Count = Annotated[int, Field(ge=0, lt=_INT64)]
#: A float that may be NaN or infinite (written as ``NaN`` / ``Infinity``): only where the writer stores undefined
#: values so (e.g. the cosine of an all-zero tensor).
AnyFloat = Annotated[float, Field(allow_inf_nan=True)]
#: A finite float in ``[0, 1]`` (a share, a density, a ROUGE-L score).
Unit = Annotated[float, Field(ge=0, le=1)]
#: A non-empty string (a label, a component, a metric name).
NonEmpty = Annotated[str, Field(min_length=1)]


class Schema(BaseModel):
    """Base of every result-file model: strict types, finite floats, unknown fields refused."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


def bad(path: str, message: str, **values: Any) -> PydanticCustomError:
    """An error for a validator to raise about the field ``path`` (``name.sub[0]``, relative to the model
    validated: :func:`validate` appends it to the model's own location) with ``message`` (a ``str.format`` template
    over ``values``)."""
    return PydanticCustomError("patchlab", message.format(**values), {"path": path})


def _check_json(value: Any) -> Any:
    """``value`` (parsed JSON) if every number in it is finite and fits 64 bits (integers) and it is nested at most
    :data:`MAX_DEPTH` levels; walked with an explicit stack, so no depth exhausts Python's."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                raise bad(where, "nested deeper than {limit} levels", limit=MAX_DEPTH)
            pairs = list(item.items() if isinstance(item, dict) else enumerate(item))
            stack += [(v, f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else k, depth + 1)
                      for k, v in reversed(pairs)]  # popped in document order: the first bad value is reported
        elif isinstance(item, float) and not math.isfinite(item):
            raise bad(where, "a number must be finite here, got {value}", value=item)
        elif isinstance(item, int) and not isinstance(item, bool) and not -_INT64 <= item < _INT64:
            raise bad(where, "an integer must fit 64 bits here, got {value}", value=_shown(item))
    return value


#: Any JSON value whose numbers are finite (and integers 64-bit), nested at most :data:`MAX_DEPTH` levels.
FreeJson = Annotated[Any, AfterValidator(_check_json)]


class Checkpoint(Schema):
    """A checkpoint's record (:func:`patchlab.provenance.checkpoint_record`): how it was given, its weights digest."""

    source: str
    weights: str


class Provenance(Schema):
    """A result's provenance (:func:`patchlab.provenance.pair_provenance`, settings, versions); other keys are free
    JSON."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, FreeJson]

    vanilla: Checkpoint | None = None
    unlearned: Checkpoint | None = None
    model: Checkpoint | None = None
    environment: dict[str, str] = {}
    settings: dict[str, FreeJson] = {}


def _shown(value: Any) -> str:
    """A short repr of a bad input for an error message (a long integer as its digit count: the repr of one of more
    than 4300 digits raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    return reprlib.repr(value)


def _location(error: Any) -> str:
    """The dotted path (``per_question.coef[2][0]``) of one pydantic error, with a :func:`bad` error's own path."""
    out = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"])
    inner = (error.get("ctx") or {}).get("path", "")
    out = (out + (inner if inner.startswith("[") else f".{inner}") if inner else out).lstrip(".") or "(top level)"
    return out if len(out) <= 120 else f"{out[:60]}...{out[-50:]}"


def describe(err: ValidationError) -> str:
    """``"<first bad field>: <problem> (and N more problems)"`` for a pydantic error."""
    errors = err.errors(include_url=False)
    first = errors[0]
    message = first["msg"]
    if first["type"] != "patchlab" and "input" in first and not isinstance(first["input"], (dict, list)):
        message += f", got {_shown(first['input'])}"
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    return f"{_location(first)}: {message}{more}"


def validate(schema: type[M], data: Any, path: str | os.PathLike, what: str) -> M:
    """``data`` (a parsed JSON file) checked against ``schema``.

    Raises:
        PatchlabValueError: ``data`` does not follow the schema; the message names ``path``, ``what`` and the first
            bad field's path.
    """
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise PatchlabValueError(f"{path} is not a valid {what}: {describe(err)}") from None
