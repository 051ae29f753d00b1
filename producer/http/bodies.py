"""What every OpenAI body -> contract mapping shares (chat.py, embeddings.py).

A body is a JSON object; OpenAI's `user` (the end user's id) is kept in
`metadata["end_user"]` and `metadata["caller"]` is always the key's name, whatever the
body said; and the contract's pydantic verdict becomes OpenAI's 400 whose `param` names
the field as OpenAI writes it (`messages[1].content[0].image_url.url`).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from llmq.http.errors import InvalidRequestError

ModelT = TypeVar("ModelT", bound=BaseModel)


def body_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", param=None)
    return body


def job_metadata(body: dict[str, Any], caller: str) -> dict[str, Any]:
    """The job's metadata: the body's own, `user` as `end_user`, and the key's name as the caller."""
    given = body.get("metadata")
    if given is not None and not isinstance(given, dict):
        raise InvalidRequestError("'metadata' must be an object of strings", param="metadata")
    metadata = dict(given or {})
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise InvalidRequestError("'user' must be a string", param="user")
        metadata["end_user"] = user
    metadata["caller"] = caller
    return metadata


def validated(model: type[ModelT], fields: dict[str, Any]) -> ModelT:
    """`model.model_validate(fields)`, its first refusal as a 400 naming the param."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = param_name(error["loc"], fields, missing=error["type"] == "missing")
        raise InvalidRequestError(f"{param or 'body'}: {error['msg'].removeprefix('Value error, ')}", param=param) from None


def param_name(location: tuple[int | str, ...], data: Any, *, missing: bool = False) -> str | None:
    """pydantic's error location as OpenAI names the param: ("messages", 0, "content") -> messages[0].content.

    pydantic puts the names of union members and tags in a location (`'parts'`, `'list[str]'`,
    `'NamedToolChoice'`); they are not in the body, so the location is walked through the body
    itself and only what is there is kept, and a missing field (the last part) by its name.
    """
    name, node = "", data
    for position, part in enumerate(location):
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            name, node = f"{name}[{part}]", node[part]
        elif isinstance(part, str) and ((isinstance(node, dict) and part in node) or (missing and position == len(location) - 1)):
            name, node = f"{name}.{part}" if name else part, node.get(part) if isinstance(node, dict) else None
    return name or None


def split_body(body: dict[str, Any], contract_fields: frozenset[str], front_fields: frozenset[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The body's fields the contract has, and the rest; `front_fields` (read by the front itself) are in neither.

    A null is OpenAI's "not given": such a field is left out, so the contract's default applies.
    """
    fields: dict[str, Any] = {}
    others: dict[str, Any] = {}
    for name, value in body.items():
        if name in front_fields:
            continue
        if name in contract_fields:
            if value is not None:
                fields[name] = value
        else:
            others[name] = value
    return fields, others


def unrecognized(name: str) -> InvalidRequestError:
    """OpenAI's own refusal of a field it does not know, word for word."""
    return InvalidRequestError(f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")
