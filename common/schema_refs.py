"""`$ref`s inside a JSON schema: which cannot be resolved, and moving a schema under another root.

A tool's parameters are a schema of their own (Pydantic writes a nested model as `$defs` plus
`{"$ref": "#/$defs/Model"}`), but the tool-call grammar embeds them in a bigger schema, where `#`
means the bigger one's root. `rebase` rewrites a schema's local references for the place it is moved
to; `unresolved_refs` finds, before anything is compiled, the references that point nowhere, so a
client hears which one. Only local references (`#`, `#/json/pointer`) are followed: nothing is
fetched, as llguidance fetches nothing.
"""

from __future__ import annotations

from urllib.parse import unquote

# Keywords whose values are data, not schemas: a "$ref" key inside them is not a reference.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples", "example"})
# Keywords whose values map names (of properties, of definitions) to schemas: a property may be
# called "enum" or "$ref".
_MAP_KEYWORDS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def _walk(node, visit) -> None:
    if isinstance(node, list):
        for item in node:
            _walk(item, visit)
    elif isinstance(node, dict):
        visit(node)
        for key, value in node.items():
            if key in _MAP_KEYWORDS and isinstance(value, dict):
                for sub in value.values():
                    _walk(sub, visit)
            elif key not in _DATA_KEYWORDS and key != "$ref":
                _walk(value, visit)


def references(schema) -> list[str]:
    found: list[str] = []
    _walk(schema, lambda node: isinstance(node.get("$ref"), str) and found.append(node["$ref"]))
    return found


def resolves(schema, ref: str) -> bool:
    """Whether `ref` points at a schema inside `schema` (a local JSON pointer)."""
    if not ref.startswith("#"):
        return False
    pointer = unquote(ref[1:])
    if pointer == "":
        return True
    if not pointer.startswith("/"):
        return False  # an anchor name: not supported
    node = schema
    for part in pointer[1:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return isinstance(node, (dict, bool))


def unresolved_refs(schema) -> list[str]:
    """The references in `schema` that do not point inside it, in order of appearance, once each."""
    return list(dict.fromkeys(r for r in references(schema) if not resolves(schema, r)))


def rebase(schema, pointer: str):
    """A copy of `schema` for its new place at JSON pointer `pointer` of another document: every local
    reference gets the pointer in front (`#/$defs/A` -> `#<pointer>/$defs/A`, `#` -> `#<pointer>`)."""
    if isinstance(schema, list):
        return [rebase(item, pointer) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = "#" + pointer + value[1:]
        elif key in _MAP_KEYWORDS and isinstance(value, dict):
            out[key] = {name: rebase(sub, pointer) for name, sub in value.items()}
        elif key in _DATA_KEYWORDS:
            out[key] = value
        else:
            out[key] = rebase(value, pointer)
    return out
