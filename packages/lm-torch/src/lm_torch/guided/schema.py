"""`check_schema`: a JSON schema as xgrammar 0.2.9 will enforce it, or a ValueError that says why it cannot be.

xgrammar compiles most of JSON Schema, but some keywords it ignores without a word, and some combinations it
reads only in part (tried one by one against its matcher):
- ignored anywhere: `not`, `if`/`then`/`else`, `uniqueItems`, `dependentRequired`/`dependentSchemas`/`dependencies`,
  `contentEncoding`/`contentMediaType`/`contentSchema`, `$ref`s outside the document, `multipleOf` that is not an
  integer, `format`s outside `ENFORCED_FORMATS`;
- ignored without a `type`: the keywords of numbers and strings (`minimum`, `maxLength`, `pattern`, ...);
- `contains`, `minContains`, `maxContains`: ignored next to `items`, and without it no array is allowed at all;
- `allOf`: types and scalar keywords of the parts are not combined (`allOf` of string and integer allows both);
- keywords next to `anyOf`/`oneOf`/`$ref`: ignored; `oneOf` is read as `anyOf`;
- keywords next to `enum`/`const`: ignored (`{"type": "string", "enum": [1]}` allows 1);
- a string's `pattern`, `format` and length bounds: only one of them is enforced;
- `required` names missing from `properties`: ignored, and strict mode then forbids them.

Those are refused with a ValueError naming the keyword, or rewritten into what xgrammar enforces: `allOf` merged into
one schema, keywords next to `anyOf`/`oneOf` merged into each branch, `$ref` with siblings resolved and merged,
required names added to `properties`. `oneOf` is kept only where its branches exclude each other (then it means
`anyOf`). Schemas that no value satisfies are refused: contradictory types, empty `enum`, `enum`/`const` values
outside the schema's other constraints, empty numeric or length ranges, required properties forbidden by
`additionalProperties: false`. Subschemas are checked where they stand (`anyOf` branches, `$defs`, properties):
one that no value satisfies is refused even where the whole could still be satisfied without it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, TypeGuard

# The formats xgrammar 0.2.9 turns into a grammar; it lets any string through for the others.
ENFORCED_FORMATS = frozenset({
    "date", "date-time", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uri-reference",
    "uri-template", "uuid", "json-pointer", "relative-json-pointer",
})  # fmt: skip
UNENFORCED = frozenset({
    "not", "if", "then", "else", "contentEncoding", "contentMediaType", "contentSchema", "$dynamicRef", "$recursiveRef",
    "contains", "minContains", "maxContains", "dependentRequired", "dependentSchemas", "dependencies",
})  # fmt: skip
# Keywords of numbers and strings, which xgrammar ignores in a schema without `type` (object and array keywords make
# it assume their type).
SCALAR_KEYWORDS = (
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "pattern",
    "format",
)  # fmt: skip
LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")
# Keywords that only describe (ignored by validation, kept by the first part that has them when merging).
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$comment", "$schema", "$id", "$anchor", "deprecated", "readOnly",
    "writeOnly",
})  # fmt: skip
SIZE_BOUNDS = {
    "string": ("minLength", "maxLength"),
    "array": ("minItems", "maxItems"),
    "object": ("minProperties", "maxProperties"),
}


def check_schema(schema: Any) -> Any:
    """`schema` rewritten into what xgrammar enforces; ValueError naming the keyword and its place if it cannot be."""
    try:
        return _Checker(schema).check(schema, "#")
    except RecursionError:
        raise ValueError("response_format: the JSON schema is nested too deeply") from None
    except (TypeError, AttributeError) as exc:  # a keyword with a value of the wrong JSON type
        raise ValueError(f"response_format: the JSON schema is malformed: {exc}") from None


class _Checker:
    def __init__(self, root: Any) -> None:
        self.root = root

    def check(self, schema: Any, path: str) -> Any:
        if schema is True or schema == {}:
            return schema
        if schema is False:
            raise _unsatisfiable(path, "the schema is false")
        if not isinstance(schema, dict):
            raise ValueError(f"response_format: the JSON schema at {path} must be an object or a boolean")
        for keyword in sorted(UNENFORCED & schema.keys()):
            raise _unsupported(path, keyword)
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or not parts:
                raise ValueError(f"response_format: allOf at {path} must be a non-empty array")
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for i, part in enumerate(parts):
                merged = self.merge(merged, part, f"{path}/allOf/{i}")
            return self.check(merged, path)
        if "$ref" in schema:
            ref = schema["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#"):
                raise _unsupported(path, "$ref", "only references inside the schema (#/...) are followed")
            if set(schema) - ANNOTATIONS - {"$ref", "$defs", "definitions"}:
                siblings = {k: v for k, v in schema.items() if k not in ("$ref", "$defs", "definitions")}
                merged = self.merge(self.resolve(ref, path), siblings, path)
                schema = {**{k: schema[k] for k in ("$defs", "definitions") if k in schema}, **merged}
                return self.check(schema, path)
        for combinator in ("anyOf", "oneOf"):
            if combinator in schema:
                return self.check_choice(schema, combinator, path)
        out = dict(schema)
        types = self.check_type(out, path)
        if "enum" in out or "const" in out:
            return self.check_values(out, types, path)
        self.check_bounds(out, types, path)
        for keyword in SCALAR_KEYWORDS if types is None else ():
            if keyword in out:
                raise ValueError(
                    f"response_format: the JSON schema keyword {keyword!r} at {path} needs a 'type' (guided decoding "
                    "enforces it only on a schema that declares its type)"
                )
        # A format on numbers (OpenAPI's int32, double, ...) says nothing of strings: left as it is.
        if "format" in out and out["format"] not in ENFORCED_FORMATS and types and "string" in types:
            raise _unsupported(path, "format", f"{out['format']!r} is not one of {', '.join(sorted(ENFORCED_FORMATS))}")
        # xgrammar builds a string from one of: pattern, format, length bounds; it drops the others.
        string_rules = [k for k in ("pattern", "format") if k in out] + [
            k for k in ("minLength", "maxLength") if k in out
        ][:1]
        if len(string_rules) > 1 and types and "string" in types:
            raise _unsupported(path, string_rules[1], f"it is not enforced together with {string_rules[0]}")
        if "multipleOf" in out:
            step = out["multipleOf"]
            if not (types == {"integer"} and isinstance(step, int) and not isinstance(step, bool) and step > 0):
                raise _unsupported(path, "multipleOf", "only a positive integer multipleOf of an integer is enforced")
        if out.get("uniqueItems") is True:
            raise _unsupported(path, "uniqueItems")
        self.check_required(out, path)
        if isinstance(out.get("properties"), dict):
            properties = {}
            for name, sub in out["properties"].items():  # a loop, not a comprehension: one frame per level
                properties[name] = self.check(sub, f"{path}/properties/{_escape(name)}")
            out["properties"] = properties
        for key in ("items", "additionalProperties", "propertyNames", "unevaluatedProperties"):
            if isinstance(out.get(key), dict):
                out[key] = self.check(out[key], f"{path}/{key}")
        if isinstance(out.get("prefixItems"), list):
            out["prefixItems"] = [self.check(s, f"{path}/prefixItems/{i}") for i, s in enumerate(out["prefixItems"])]
        for key in ("$defs", "definitions", "patternProperties", "dependentSchemas"):
            if isinstance(out.get(key), dict):
                out[key] = {name: self.check(s, f"{path}/{key}/{name}") for name, s in out[key].items()}
        return out

    def check_type(self, schema: dict, path: str) -> set[str] | None:
        if "type" not in schema:
            return None
        declared = schema["type"]
        types = set(declared) if isinstance(declared, list) else {declared}
        if not types:
            raise _unsatisfiable(path, "'type' is an empty list")
        return types

    def check_values(self, schema: dict, types: set[str] | None, path: str) -> dict:
        """enum/const: every value must satisfy the schema's other keywords, which xgrammar does not apply to them."""
        keyword = "const" if "const" in schema else "enum"
        values = [schema["const"]] if keyword == "const" else schema["enum"]
        if keyword == "const" and "enum" in schema:
            values = [v for v in schema["enum"] if _same(v, schema["const"])]
            if not values:
                raise _unsatisfiable(path, "const is not one of enum")
        if not isinstance(values, list):
            raise ValueError(f"response_format: enum at {path} must be an array")
        if not values:
            raise _unsatisfiable(path, "enum is empty")
        others = set(schema) - ANNOTATIONS - {"enum", "const", "type", *LOWER_BOUNDS, *UPPER_BOUNDS}
        if others:
            raise _unsupported(path, sorted(others)[0], f"it is not enforced next to {keyword}")
        self.check_bounds(schema, types, path)
        problems = [(value, _value_problem(value, schema, types)) for value in values]
        problems = [(value, problem) for value, problem in problems if problem is not None]
        if problems:
            value, problem = problems[0]
            what = f"the {keyword} value {json.dumps(value)[:80]} {problem}"
            if len(problems) == len(values):
                raise _unsatisfiable(path, what)
            raise ValueError(f"response_format: {what} (at {path}), and guided decoding could produce it: remove it")
        return schema

    def check_bounds(self, schema: dict, types: set[str] | None, path: str) -> None:
        for low, high in (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties")):
            if _is_number(schema.get(low)) and _is_number(schema.get(high)) and schema[low] > schema[high]:
                raise _unsatisfiable(path, f"{low} {schema[low]} is greater than {high} {schema[high]}")
        lo, lo_open = _lower(schema)
        hi, hi_open = _upper(schema)
        if not _is_number(lo) or not _is_number(hi) or (types is not None and not types & {"number", "integer"}):
            return
        if lo > hi or (lo == hi and (lo_open or hi_open)):
            raise _unsatisfiable(path, f"no number lies between the lower bound {lo} and the upper bound {hi}")
        if types == {"integer"}:
            first = math.floor(lo) + 1 if lo_open or lo != math.floor(lo) else lo
            last = math.ceil(hi) - 1 if hi_open or hi != math.ceil(hi) else hi
            if first > last:
                raise _unsatisfiable(path, f"no integer lies between the lower bound {lo} and the upper bound {hi}")

    def check_required(self, schema: dict, path: str) -> None:
        """Required names missing from `properties` become properties (of additionalProperties' schema, or any
        value), unless additionalProperties is false: then no object satisfies the schema."""
        required = schema.get("required")
        if not isinstance(required, list):
            return
        properties = dict(schema.get("properties") or {})
        for name in required:
            if name in properties:
                continue
            extra = schema.get("additionalProperties", True)
            if extra is False or schema.get("unevaluatedProperties") is False:
                raise _unsatisfiable(path, f"the required property {name!r} is excluded by additionalProperties: false")
            properties[name] = self._pattern_schema(schema, name) or (extra if isinstance(extra, dict) else {})
        if properties:
            schema["properties"] = properties

    def _pattern_schema(self, schema: dict, name: str) -> Any:
        for pattern, sub in (schema.get("patternProperties") or {}).items():
            try:
                if re.search(pattern, name):
                    return sub
            except re.error:
                continue
        return None

    def check_choice(self, schema: dict, combinator: str, path: str) -> dict:
        """anyOf/oneOf: the keywords beside it merged into each branch (xgrammar reads only the branches)."""
        branches = schema[combinator]
        if not isinstance(branches, list) or not branches:
            raise ValueError(f"response_format: {combinator} at {path} must be a non-empty array")
        if "anyOf" in schema and "oneOf" in schema:
            raise _unsupported(path, "oneOf", "it is not enforced next to anyOf")
        keep = {k: v for k, v in schema.items() if k in ANNOTATIONS or k in ("$defs", "definitions")}
        siblings = {k: v for k, v in schema.items() if k not in keep and k != combinator}
        checked = []
        for i, branch in enumerate(branches):
            where = f"{path}/{combinator}/{i}"
            checked.append(self.check(self.merge(siblings, branch, where) if siblings else branch, where))
        if combinator == "oneOf":
            for i in range(len(checked)):
                for j in range(i + 1, len(checked)):
                    if not self.disjoint(checked[i], checked[j]):
                        raise _unsupported(
                            path, "oneOf", f"branches {i} and {j} may both match, and only anyOf is enforced"
                        )
        for key in ("$defs", "definitions"):
            if isinstance(keep.get(key), dict):
                keep[key] = {name: self.check(s, f"{path}/{key}/{name}") for name, s in keep[key].items()}
        return {**keep, "anyOf": checked}

    def disjoint(self, a: Any, b: Any) -> bool:
        """Whether no value can match both (decided on types, enum/const, or a required property's values)."""
        if not isinstance(a, dict) or not isinstance(b, dict):
            return False
        if "$ref" in a or "$ref" in b:
            a = self.resolve(a["$ref"], "#") if "$ref" in a else a
            b = self.resolve(b["$ref"], "#") if "$ref" in b else b
            if not isinstance(a, dict) or not isinstance(b, dict) or "$ref" in a or "$ref" in b:
                return False
        ta, tb = _types(a), _types(b)
        if ta is not None and tb is not None and not _intersect_types(ta, tb):
            return True
        va, vb = _values(a), _values(b)
        if va is not None and vb is not None and not any(_same(x, y) for x in va for y in vb):
            return True
        shared = set(a.get("required") or ()) & set(b.get("required") or ())
        pa, pb = a.get("properties") or {}, b.get("properties") or {}
        return any(name in pa and name in pb and self.disjoint(pa[name], pb[name]) for name in shared)

    def resolve(self, ref: str, path: str) -> Any:
        target = self.root
        for part in ref[1:].split("/")[1:] if ref != "#" else ():
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise ValueError(f"response_format: the JSON schema's $ref {ref!r} at {path} points nowhere")
            target = target[part]
        return target

    def merge(self, a: Any, b: Any, path: str) -> Any:
        """One schema that matches what both `a` and `b` match (allOf of the two)."""
        if a is False or b is False:
            raise _unsatisfiable(path, "allOf contains false")
        if a is True or a == {}:
            return b
        if b is True or b == {}:
            return a
        if not isinstance(a, dict) or not isinstance(b, dict):
            raise ValueError(f"response_format: the JSON schema at {path} must be an object or a boolean")
        for side in (a, b):
            for keyword in UNENFORCED & side.keys():
                raise _unsupported(path, keyword)
        if "$ref" in a or "$ref" in b or "allOf" in a or "allOf" in b:
            a, b = self._expand(a, path), self._expand(b, path)
        choices = [s for s in (a, b) if "anyOf" in s or "oneOf" in s]
        if len(choices) == 2:
            raise _unsupported(path, "allOf", "it cannot combine two anyOf/oneOf schemas")
        if choices:  # allOf of a choice and a schema: the schema goes into each branch (check_choice does it)
            choice, other = (a, b) if choices[0] is a else (b, a)
            return {**other, **choice}
        out = dict(a)
        for key, value in b.items():
            if key not in out or key in ANNOTATIONS:
                out.setdefault(key, value)
            elif key == "type":
                common = _intersect_types(_types(a) or set(), _types(b) or set())
                if not common:
                    raise _unsatisfiable(path, f"allOf requires the types {a['type']!r} and {value!r} at once")
                out["type"] = sorted(common) if len(common) > 1 else next(iter(common))
            elif key in ("enum", "const"):
                kept = [v for v in _values(a) or () if any(_same(v, w) for w in _values(b) or ())]
                if not kept:
                    raise _unsatisfiable(path, "allOf requires enum/const values that no part shares")
                out.pop("const", None)
                out["enum"] = kept
            elif key in LOWER_BOUNDS:
                out[key] = max(out[key], value)
            elif key in UPPER_BOUNDS:
                out[key] = min(out[key], value)
            elif key == "required":
                out[key] = list(dict.fromkeys([*out[key], *value]))
            elif key == "uniqueItems":
                out[key] = out[key] or value
            elif key == "properties":
                merged = dict(out[key])
                for name, sub in value.items():
                    merged[name] = (
                        self.merge(merged[name], sub, f"{path}/properties/{_escape(name)}") if (name in merged) else sub
                    )
                out[key] = merged
            elif key in ("items", "additionalProperties", "unevaluatedProperties", "propertyNames") and isinstance(
                value, (dict, bool)
            ):
                out[key] = self.merge(out[key], value, f"{path}/{key}")
            elif key in ("$defs", "definitions"):
                out[key] = {**out[key], **value}
            elif not _same(out[key], value):
                raise _unsupported(path, key, "allOf cannot combine two different values of it")
        for side in (a, b):  # additionalProperties: false of one part forbids the other part's extra properties
            if side.get("additionalProperties") is False and "properties" in out:
                own = side.get("properties") or {}
                out["properties"] = {k: v for k, v in out["properties"].items() if k in own}
        return out

    def _expand(self, schema: dict, path: str) -> Any:
        """`schema` without a top-level $ref or allOf (both merged into it)."""
        if "$ref" in schema:
            ref = schema["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#"):
                raise _unsupported(path, "$ref", "only references inside the schema (#/...) are followed")
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            return self.merge(self.resolve(ref, path), rest, path)
        if "allOf" in schema:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for i, part in enumerate(schema["allOf"]):
                merged = self.merge(merged, part, f"{path}/allOf/{i}")
            return merged
        return schema


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _types(schema: dict) -> set[str] | None:
    declared = schema.get("type")
    if declared is None:
        return None
    return set(declared) if isinstance(declared, list) else {declared}


def _intersect_types(a: set[str], b: set[str]) -> set[str]:
    """The types a value of both sets can have (an integer is a number)."""
    common = a & b
    if ("integer" in a and "number" in b) or ("number" in a and "integer" in b):
        common.add("integer")
    return common


def _values(schema: dict) -> list | None:
    if "const" in schema:
        return [schema["const"]]
    return schema.get("enum")


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _lower(schema: dict) -> tuple[float | None, bool]:
    """The tightest lower numeric bound and whether it is exclusive."""
    lo, ex = schema.get("minimum"), schema.get("exclusiveMinimum")
    if isinstance(ex, bool) or ex is None:
        return lo, ex is True  # draft 4: exclusiveMinimum is a flag on minimum
    return (ex, True) if lo is None or ex >= lo else (lo, False)


def _upper(schema: dict) -> tuple[float | None, bool]:
    hi, ex = schema.get("maximum"), schema.get("exclusiveMaximum")
    if isinstance(ex, bool) or ex is None:
        return hi, ex is True
    return (ex, True) if hi is None or ex <= hi else (hi, False)


def _value_problem(value: Any, schema: dict, types: set[str] | None) -> str | None:
    """Why `value` fails the schema's type and bounds, or None."""
    kind = _json_type(value)
    if types is not None and kind not in types and not (kind == "integer" and "number" in types):
        return f"is not of type {'/'.join(sorted(types))}"
    if kind in ("integer", "number"):
        lo, lo_open = _lower(schema)
        hi, hi_open = _upper(schema)
        if lo is not None and (value < lo or (lo_open and value == lo)):
            return f"is below the lower bound {lo}"
        if hi is not None and (value > hi or (hi_open and value == hi)):
            return f"is above the upper bound {hi}"
    if kind in SIZE_BOUNDS:
        low, high = SIZE_BOUNDS[kind]
        if len(value) < schema.get(low, 0) or len(value) > schema.get(high, len(value)):
            return f"does not satisfy {low}/{high}"
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _unsatisfiable(path: str, reason: str) -> ValueError:
    return ValueError(f"response_format: no JSON value satisfies the schema: {reason} (at {path})")


def _unsupported(path: str, keyword: str, why: str = "guided decoding cannot enforce it") -> ValueError:
    return ValueError(f"response_format: the JSON schema keyword {keyword!r} at {path} is not supported: {why}")
