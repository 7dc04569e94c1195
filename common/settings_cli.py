"""Settings whose fields are both environment variables and command-line flags.

A field `max_wait_ms` reads the env var MAX_WAIT_MS and the flag --max-wait-ms; a flag beats the env
var, which beats the default. The field's description is the flag's help text.
"""

from __future__ import annotations

import argparse
from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


def parse_settings(cls: type[S], argv: list[str] | None = None, description: str = "") -> S:
    parser = argparse.ArgumentParser(description=description)
    for name, field in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description or ''} (env {name.upper()}, default {field.default!r})"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return cls(**given)
    except ValidationError as e:  # a bad setting: say which, without a traceback (exit status 2)
        parser.error("; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors()))
