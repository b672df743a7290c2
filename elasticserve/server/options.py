"""What `build_app` serves beyond the engines: names, API key, CORS, chat template."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from elasticserve.server.errors import APIError


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """Server-wide options (the `serve` flags of the same names)."""

    # bearer key every /v1/* request must carry; None: no check
    api_key: str | None = None
    # origins a browser may call from (CORS); empty: no CORS headers at all
    allowed_origins: tuple[str, ...] = ()
    # Jinja text replacing every model's own chat template; None: the model's
    chat_template: str | None = None
    # other names a served model answers to (--served-model-name extras, a model's path)
    aliases: Mapping[str, str] = field(default_factory=dict)
    # the engines' admission control ("none" | "slo"): with "slo" a stream's headers wait for
    # its first output, so a refusal is a 503 before the stream starts
    admission: str = "none"

    def __post_init__(self) -> None:
        if self.admission not in ("none", "slo"):
            raise ValueError(f"admission must be 'none' or 'slo', got {self.admission!r}")


def load_chat_template(value: str) -> str:
    """`--chat-template`: a file's contents if `value` names a file, else the template itself.

    A value that looks like a path (no Jinja markup) but names no file is an error, not a
    template that would render its own file name."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" not in value and "{%" not in value:
        raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")
    return value


class ModelNames:
    """Maps the `model` field of a request to the served model it names."""

    def __init__(self, served: Iterable[str], aliases: Mapping[str, str]) -> None:
        self.served = list(served)
        for alias, target in aliases.items():
            if target not in self.served:
                raise ValueError(f"alias {alias!r} names {target!r}, which is not served")
            if alias in self.served and alias != target:
                raise ValueError(f"alias {alias!r} is already a served model's name")
        self.aliases = {a: t for a, t in aliases.items() if a != t}

    def resolve(self, model: str | None) -> str:
        """The served name for a request's `model`; APIError 400 (missing) / 404 (unknown)."""
        if model is None:
            if len(self.served) == 1:
                return self.served[0]
            raise APIError(400, f"model is required: several models are served: "
                                f"{sorted(self.served)}", "model")
        if model in self.served:
            return model
        if model in self.aliases:
            return self.aliases[model]
        raise APIError(404, f"The model `{model}` does not exist; served models: "
                            f"{sorted(self.served)}", "model", code="model_not_found")

    def listed(self) -> list[tuple[str, str]]:
        """(name, served model) for /v1/models: every served name, then every alias."""
        return [(n, n) for n in self.served] + list(self.aliases.items())
