"""JSON that is really JSON: an answer to a request that asked for JSON is parsed, and checked
against the schema when one was given, before the job may succeed.

An answer that is not JSON, or does not match, raises `OutputValidationError`; `parsed` is
only ever set to what passed. A request that asked for no JSON costs one attribute read.
The schema is checked with `jsonschema` (draft 2020-12); a compiled validator is kept per
schema, since a batch asks with the same schema many times.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from llmq.contract.models import LLMRequest, LLMResponse
from llmq.worker.errors import OutputValidationError

#: Compiled validators kept, one per distinct schema.
VALIDATORS_KEPT = 256


def check_output(request: LLMRequest, response: LLMResponse) -> LLMResponse:
    """The response with `parsed` set, when JSON was asked for; raises OutputValidationError."""
    response_format = request.response_format
    if response_format is None or not response_format.wants_json:
        return response
    if response.tool_calls:  # the model called a tool instead of answering: the JSON comes later
        return response
    where = {"provider": response.provider, "model": response.model}
    try:
        parsed = json.loads(response.content)
    except ValueError:
        raise OutputValidationError(
            f"JSON was asked for and the answer is not JSON (finish_reason {response.finish_reason}): "
            f"{response.content[:200]!r}", **where,
        ) from None
    schema = response_format.schema_dict
    if schema is None:
        if not isinstance(parsed, dict):
            raise OutputValidationError(f"json_object was asked for and the answer is a {type(parsed).__name__}", **where)
    else:
        problem = best_match(_validator(json.dumps(schema, sort_keys=True)).iter_errors(parsed))
        if problem is not None:
            path = "/".join(str(part) for part in problem.absolute_path) or "(top level)"
            name = response_format.json_schema.name if response_format.json_schema else "schema"
            raise OutputValidationError(
                f"the answer does not match JSON schema {name!r} at {path}: {problem.message[:300]}", **where
            )
    return response.model_copy(update={"parsed": parsed})


@lru_cache(maxsize=VALIDATORS_KEPT)
def _validator(schema_json: str) -> Any:
    return Draft202012Validator(json.loads(schema_json))
