"""OpenAI's published OpenAPI spec as a JSON Schema validator of response bodies and stream chunks.

The spec (`../shared/openai-openapi/openapi.yaml`, OpenAI's own file, unmodified) is OpenAPI 3.1 but
still writes OpenAPI 3.0's `nullable: true` in places; here that reads as "or null"
(`anyOf: [schema, {"type": "null"}]`), and the document is then checked with a JSON Schema 2020-12
validator whose `referencing` registry resolves every `#/components/schemas/...` reference.
`OPENAI_SPEC` overrides where the file is looked for (`spec_path`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC_URI = "urn:openai:openapi"
_IN_SHARED = Path("shared") / "openai-openapi" / "openapi.yaml"


def _origin_dir() -> Path | None:
    """The checkout this one was cloned from, when that is a folder on this machine (`git clone . /tmp/x`)."""
    import subprocess

    try:
        url = subprocess.run(["git", "-C", str(ROOT), "config", "remote.origin.url"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(url.removeprefix("file://")) if url and "://" not in url.removeprefix("file://") else None
    return path.resolve() if path is not None and path.is_dir() else None


def spec_path() -> Path:
    """OPENAI_SPEC, else the `shared/` folder beside the checkout (where every checkout has it), inside
    it, or beside the checkout it was cloned from."""
    if os.environ.get("OPENAI_SPEC"):
        return Path(os.environ["OPENAI_SPEC"])
    places = [ROOT.parent / _IN_SHARED, ROOT / _IN_SHARED]
    origin = _origin_dir()
    if origin is not None:
        places.append(origin.parent / _IN_SHARED)
    for place in places:
        if place.is_file():
            return place
    raise FileNotFoundError("OpenAI's spec is not in any of " + ", ".join(map(str, places)) +
                            "; set OPENAI_SPEC to its openapi.yaml")


def or_null(node):
    """The spec with every `nullable: true` turned into JSON Schema's "or null" (recursively, copied)."""
    if isinstance(node, list):
        return [or_null(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: or_null(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def _registry_and_spec():
    import yaml
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    with spec_path().open() as f:
        spec = or_null(yaml.safe_load(f))
    resource = Resource.from_contents(spec, default_specification=DRAFT202012)
    return Registry().with_resource(SPEC_URI, resource), spec


def schema_names() -> set[str]:
    return set(_registry_and_spec()[1]["components"]["schemas"])


@functools.cache
def validator(schema_name: str):
    """A 2020-12 validator of one `components/schemas` entry."""
    from jsonschema import Draft202012Validator

    registry, spec = _registry_and_spec()
    if schema_name not in spec["components"]["schemas"]:
        raise KeyError(f"{schema_name} is not a schema of {spec_path()}")
    return Draft202012Validator({"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"}, registry=registry)


def errors(schema_name: str, instance) -> list[tuple[tuple, str]]:
    """Every way `instance` breaks the named schema, as (path inside the instance, message). A failed
    anyOf/oneOf is reported through the branch that got furthest (jsonschema's best_match)."""
    from jsonschema.exceptions import best_match

    out = []
    for e in validator(schema_name).iter_errors(instance):
        deepest = best_match([e])
        out.append((tuple(deepest.absolute_path), deepest.message))
    return out


def describe(schema_name: str, error: tuple[tuple, str]) -> str:
    path, message = error
    return f"{schema_name} at {'/'.join(str(p) for p in path) or '(root)'}: {message}"


def problems(schema_name: str, instance) -> list[str]:
    """Every way `instance` breaks the named schema as readable lines (empty when it conforms)."""
    return [describe(schema_name, e) for e in errors(schema_name, instance)]


def member_for_type(union_name: str, type_value: str) -> str:
    """The member of a union of event schemas (e.g. ResponseStreamEvent) whose `type` is `type_value`, so that an
    event is judged by its own schema (a failed anyOf names no reason)."""
    spec = _registry_and_spec()[1]["components"]["schemas"]
    for member in spec[union_name]["anyOf"]:
        name = member["$ref"].rsplit("/", 1)[1]
        if type_value in spec[name].get("properties", {}).get("type", {}).get("enum", []):
            return name
    raise KeyError(f"no member of {union_name} has type {type_value!r}")
