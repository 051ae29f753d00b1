"""`ChatLLMQ.with_structured_output` by llmq's `response_format`: the schema goes to the provider as
a JSON schema (or JSON mode), llmq checks the answer against it before the job may succeed, and
the answer's `parsed` becomes the output (an instance of the caller's pydantic class when one
was given). `function_calling` is LangChain's own: a forced tool call, read back by its parsers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial
from operator import itemgetter
from typing import Any, Literal, cast

from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.pydantic import is_basemodel_subclass, is_pydantic_v2_subclass
from pydantic import BaseModel, ValidationError
from pydantic.v1 import ValidationError as ValidationErrorV1

from llmq.contract.messages import strict_schema
from llmq.langchain.messages import PARSED_KEY

StructuredMethod = Literal["json_schema", "json_mode", "function_calling"]
#: A JSON schema's name, as OpenAI (and so llmq) takes it.
_NOT_IN_A_NAME = re.compile(r"[^a-zA-Z0-9_-]")


def response_format_for(schema: Any, method: StructuredMethod, strict: bool | None) -> Any:
    """llmq's `response_format` for `schema` (a pydantic class, a TypedDict or a JSON schema)."""
    if method == "json_mode":
        return {"type": "json_object"}
    if isinstance(schema, type) and is_pydantic_v2_subclass(schema) and strict is not False:
        return schema  # llmq's own: the class's schema made strict, and `parsed` back as an instance
    json_schema = convert_to_json_schema(schema)
    if strict:
        json_schema = strict_schema(json_schema)
    name = _NOT_IN_A_NAME.sub("_", str(json_schema.get("title") or "output"))[:64]
    return {"type": "json_schema", "json_schema": {"name": name, "schema": json_schema, "strict": strict}}


def parse_answer(message: BaseMessage, schema: Any) -> Any:
    """The answer's checked JSON, as an instance of `schema` when it is a pydantic class."""
    if PARSED_KEY not in message.additional_kwargs:
        raise OutputParserException("the answer carries no parsed JSON (was it asked for with response_format?)",
                                    llm_output=message.text)
    value = message.additional_kwargs[PARSED_KEY]
    if not (isinstance(schema, type) and is_basemodel_subclass(schema)) or isinstance(value, schema):
        return value
    try:
        if issubclass(schema, BaseModel):
            return schema.model_validate(value)
        return cast(Any, schema).parse_obj(value)  # a pydantic.v1 class
    except (ValidationError, ValidationErrorV1) as exc:
        raise OutputParserException(f"the answer does not fit {schema.__name__}: {exc}",
                                    llm_output=message.text) from exc


def with_parser(
    model: Runnable[LanguageModelInput, BaseMessage], schema: Any, *, include_raw: bool
) -> Runnable[LanguageModelInput, Any]:
    """`model` followed by `parse_answer`; with `include_raw`, `{"raw", "parsed", "parsing_error"}`
    with a parsing error caught and returned, as LangChain's own models do."""
    parser = RunnableLambda(partial(parse_answer, schema=schema), name="llmq_parsed_answer")
    if not include_raw:
        return model | parser
    parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
    unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=model) | parsed.with_fallbacks([unparsed], exception_key="parsing_error")


def trace_format(schema: Any, method: StructuredMethod, strict: bool | None) -> Mapping[str, Any]:
    """What LangChain's callbacks are told of the structured output (`ls_structured_output_format`)."""
    return {"kwargs": {"method": method, "strict": strict}, "schema": schema}
