"""JSON Schema in the form Gemini's `Schema` takes: a subset of OpenAPI 3.0's Schema object
(https://ai.google.dev/api/caching#Schema), for `functionDeclarations[].parameters` and
`generationConfig.responseSchema`.

What is rewritten:

- `$ref` to `$defs` / `definitions` is inlined (Gemini's `Schema` has no references); a schema
  that refers to itself is cut where it would recur, to an untyped node of its kind
- `type: [..., "null"]` and an `anyOf` / `oneOf` branch `{"type": "null"}` become `nullable: true`;
  several types become an `anyOf`; type names are upper-case (`STRING`, `OBJECT`, ...)
- `oneOf` becomes `anyOf`, `allOf` is merged into one schema (properties and `required` united)
- a string `const` becomes a one-value `enum`; `examples[0]` becomes `example`
- objects with more than one property get `propertyOrdering` in the schema's own order, so
  the answer's keys come in that order (Gemini 2.0 otherwise orders them alphabetically)

What is dropped, because Gemini refuses it (400 `Unknown name ...`) or has no such keyword:
everything not in `KEPT_KEYWORDS`, in particular `additionalProperties`, `patternProperties`,
`unevaluatedProperties`, `propertyNames`, `dependentRequired`, `prefixItems`, `contains`,
`uniqueItems`, `not`, `if` / `then` / `else`, `exclusiveMinimum` / `exclusiveMaximum`,
`multipleOf`, `$schema`, `$id`, `$comment`; an `enum` of anything but strings; and a `format`
Gemini does not take for the type (`FORMATS`). Nothing is lost for the caller: llmq checks the
answer against the full schema (`worker/output.py`) before the job may succeed.
"""

from __future__ import annotations

from typing import Any

#: Keywords of Gemini's Schema object (v1beta) kept as they are, once their values are converted.
KEPT_KEYWORDS = frozenset({
    "type", "format", "title", "description", "nullable", "enum", "items", "minItems", "maxItems",
    "properties", "required", "minProperties", "maxProperties", "minLength", "maxLength", "pattern",
    "minimum", "maximum", "anyOf", "propertyOrdering", "default", "example",
})
#: The `format` values Gemini takes, by type (others get a 400 "only 'enum' and 'date-time' are supported").
FORMATS = {"STRING": {"date-time", "enum"}, "NUMBER": {"float", "double"}, "INTEGER": {"int32", "int64"}}
_TYPES = {"string", "number", "integer", "boolean", "array", "object"}


def gemini_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` (JSON Schema) as Gemini's OpenAPI-subset `Schema`."""
    definitions = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    return _Converter(definitions).convert(schema)


class _Converter:
    def __init__(self, definitions: dict[str, Any]) -> None:
        self.definitions = definitions
        self.expanding: list[str] = []

    def convert(self, node: Any) -> dict[str, Any]:
        if not isinstance(node, dict):
            return {}
        if isinstance(node.get("$ref"), str):
            return self.reference(node)
        node = self.merged_all_of(node)
        out: dict[str, Any] = {}
        nullable = self.put_type(node, out)
        branches = node.get("anyOf") or node.get("oneOf")
        if isinstance(branches, list):
            nullable = self.put_branches(branches, out) or nullable
        if nullable:
            out["nullable"] = True
        self.put_values(node, out)
        self.put_children(node, out)
        for keyword in ("title", "description", "minItems", "maxItems", "minProperties", "maxProperties",
                        "minLength", "maxLength", "pattern", "minimum", "maximum", "default", "example", "nullable"):
            if keyword in node and keyword not in out:
                out[keyword] = node[keyword]
        return out

    def reference(self, node: dict[str, Any]) -> dict[str, Any]:
        name = node["$ref"].rsplit("/", 1)[-1]
        target = self.definitions.get(name)
        if target is None or name in self.expanding:
            # A reference to itself cannot be inlined; the node keeps only its kind.
            kind = target.get("type") if isinstance(target, dict) else None
            return {"type": kind.upper()} if isinstance(kind, str) and kind in _TYPES else {}
        self.expanding.append(name)
        try:
            resolved = self.convert(target)
        finally:
            self.expanding.pop()
        # Keywords beside the $ref (a description, say) describe this use of it.
        siblings = self.convert({key: value for key, value in node.items() if key != "$ref"})
        return {**resolved, **{key: value for key, value in siblings.items() if key != "type"}}

    def merged_all_of(self, node: dict[str, Any]) -> dict[str, Any]:
        parts = node.get("allOf")
        if not isinstance(parts, list):
            return node
        merged = {key: value for key, value in node.items() if key != "allOf"}
        for part in parts:
            part = self.definitions.get(part["$ref"].rsplit("/", 1)[-1], {}) if isinstance(part, dict) \
                and isinstance(part.get("$ref"), str) else part
            if not isinstance(part, dict):
                continue
            for key, value in part.items():
                if key == "properties" and isinstance(value, dict):
                    merged["properties"] = {**(merged.get("properties") or {}), **value}
                elif key == "required" and isinstance(value, list):
                    merged["required"] = list(dict.fromkeys([*(merged.get("required") or []), *value]))
                else:
                    merged.setdefault(key, value)
        return merged

    def put_type(self, node: dict[str, Any], out: dict[str, Any]) -> bool:
        """Set `type` (or an `anyOf` of types); True when null is among them."""
        kind = node.get("type")
        kinds = kind if isinstance(kind, list) else [kind] if isinstance(kind, str) else []
        nullable = "null" in kinds
        real = [name.upper() for name in kinds if name in _TYPES]
        if len(real) == 1:
            out["type"] = real[0]
        elif len(real) > 1:
            out["anyOf"] = [{"type": name} for name in real]
        elif "properties" in node:
            out["type"] = "OBJECT"
        elif "items" in node:
            out["type"] = "ARRAY"
        elif "const" in node or "enum" in node:
            out["type"] = "STRING"
        fmt = node.get("format")
        if isinstance(fmt, str) and fmt in FORMATS.get(out.get("type", ""), ()):
            out["format"] = fmt
        return nullable

    def put_branches(self, branches: list[Any], out: dict[str, Any]) -> bool:
        """anyOf / oneOf as Gemini's anyOf; True when one branch is only null."""
        converted = [self.convert(branch) for branch in branches if not _only_null(branch)]
        if len(converted) == 1:
            out.update({key: value for key, value in converted[0].items() if key not in out})
        elif converted:
            out["anyOf"] = converted
        return len(converted) < len(branches)

    def put_values(self, node: dict[str, Any], out: dict[str, Any]) -> None:
        if isinstance(node.get("const"), str):
            out["enum"] = [node["const"]]
        elif isinstance(node.get("enum"), list) and node["enum"] and all(isinstance(value, str) for value in node["enum"]):
            out["enum"] = list(node["enum"])
        if isinstance(node.get("examples"), list) and node["examples"]:
            out["example"] = node["examples"][0]

    def put_children(self, node: dict[str, Any], out: dict[str, Any]) -> None:
        properties = node.get("properties")
        if isinstance(properties, dict):
            out["properties"] = {name: self.convert(child) for name, child in properties.items()}
            required = [name for name in node.get("required") or () if name in properties]
            if required:
                out["required"] = required
            if len(properties) > 1:
                out["propertyOrdering"] = list(properties)
        if isinstance(node.get("items"), dict):
            out["items"] = self.convert(node["items"])


def _only_null(branch: Any) -> bool:
    return isinstance(branch, dict) and branch.get("type") == "null" and len(branch) == 1
