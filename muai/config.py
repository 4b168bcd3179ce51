"""Loading the one YAML file both processes read, with profiles, environment overrides and clear errors.

Precedence, lowest first: defaults < profile < file < environment (``MUAI_<SECTION>__<KEY>``) < command-line
``--set key=value``. The merged document is validated once by the typed sections each process defines
(``orchestrator.config``, ``sidecar.config``); a bad value stops start-up with one message naming the key, the
value, what is allowed and the environment variable that overrides it.

Environment handling is done here rather than by pydantic-settings so that every error can say where the bad
value came from (file, environment variable or flag), which pydantic-settings does not track.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from orchestrator.config import (
    BatchingConfig,
    EnginesConfig,
    KvCacheConfig,
    ModelConfig,
    ServerConfig,
    TelemetryConfig,
)
from orchestrator.runtime_config import is_runtime_field
from sidecar.config import SidecarConfig

ENV_PREFIX = "MUAI_"
ENV_SEPARATOR = "__"
PROFILES = ("cpu-dev", "single-gpu", "multi-gpu")
SECRET_KEYS = frozenset({"admin_token", "secret", "bearer_token", "password"})


def default_models() -> list[ModelConfig]:
    """The embedded defaults: two random tiny LMs built locally and the packaged, real all-MiniLM-L6-v2."""
    return [
        ModelConfig(name="tiny-llama", path="builtin:tiny-llama", task="generate"),
        ModelConfig(name="tiny-gpt2", path="builtin:tiny-gpt2", task="generate", required=False),
        ModelConfig(name="minilm", path="builtin:all-minilm-l6-v2", task="embed"),
    ]


class MuaiConfig(BaseModel):
    """The whole configuration file: the orchestrator's sections and the sidecar's."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    engines: EnginesConfig = Field(EnginesConfig(), description="Engine preference order and per-engine settings.")
    models: list[ModelConfig] = Field(default_factory=default_models, description="The models to serve.")
    batching: BatchingConfig = Field(BatchingConfig(), description="Dynamic batching.")
    kv_cache: KvCacheConfig = Field(KvCacheConfig(), description="Multi-turn KV-cache reuse.")
    server: ServerConfig = Field(ServerConfig(), description="The orchestrator's HTTP server.")
    telemetry: TelemetryConfig = Field(TelemetryConfig(), description="Prometheus metrics and OpenTelemetry traces.")
    sidecar: SidecarConfig = Field(SidecarConfig(), description="The monitoring sidecar process.")

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        seen: set[str] = set()
        for model in models:
            if model.name in seen:
                raise ValueError(f"model name {model.name!r} is used twice")
            seen.add(model.name)
        return models

    @field_validator("models")
    @classmethod
    def _parallel_engines(cls, models: list[ModelConfig], info: ValidationInfo) -> list[ModelConfig]:
        """Tensor and pipeline parallelism only where an engine of the model's preference can do them: otherwise
        the layout would be ignored without a word and the model served on one rank."""
        engines = info.data.get("engines")
        if engines is None:  # engines itself was invalid; that error is reported
            return models
        for i, model in enumerate(models):
            order = [model.engine, "torch"] if model.engine else list(engines.preference)
            usable = [e for e in order if getattr(getattr(engines, e, None), "enabled", True)]
            where = f"models[{i}].engine is {model.engine!r}" if model.engine else \
                f"engines.preference is {list(engines.preference)}"
            if model.pipeline_parallel_size > 1 and "vllm" not in usable:
                raise ValueError(f"models[{i}].pipeline_parallel_size = {model.pipeline_parallel_size} needs the vllm "
                                 f"engine (the only one with pipeline parallelism), but {where} (engines.vllm.enabled "
                                 f"= {engines.vllm.enabled})")
            if model.tensor_parallel_size > 1 and not {"vllm", "deepspeed"} & set(usable):
                raise ValueError(f"models[{i}].tensor_parallel_size = {model.tensor_parallel_size} needs vllm or "
                                 f"deepspeed, but {where}")
            if model.pipeline_parallel_size > 1 and model.task != "generate":
                raise ValueError(f"models[{i}].pipeline_parallel_size applies to generative models; {model.name!r} "
                                 "is an embedding model")
        return models

    def model(self, name: str) -> ModelConfig:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)


class ConfigError(ValueError):
    """The configuration cannot be used; the message names each bad key, its value and how to override it."""


class ConfigUpdateError(ConfigError):
    """A runtime update was refused (a critical key, an unknown key, or an invalid value)."""

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------------------------------------------------------
# Locating keys in the models


def env_var_for(path: Iterable[str | int]) -> str:
    """``("server", "port")`` -> ``MUAI_SERVER__PORT``; list items override as a whole (``MUAI_MODELS``)."""
    parts: list[str] = []
    for part in path:
        if isinstance(part, int):
            break
        parts.append(str(part).upper())
    return ENV_PREFIX + ENV_SEPARATOR.join(parts)


def _model_class(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_class(arg)
        if found is not None:
            return found
    return None


def _is_list(annotation: Any) -> bool:
    return get_origin(annotation) is list


def model_at(path: Iterable[str | int]) -> type[BaseModel] | None:
    """The model class that holds the keys under ``path`` (None past a leaf)."""
    cls: type[BaseModel] | None = MuaiConfig
    for part in path:
        if cls is None:
            return None
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        cls = _model_class(field.annotation)
    return cls


def iter_fields(cls: type[BaseModel] = MuaiConfig, prefix: str = "") -> Iterable[tuple[str, Any, type[BaseModel]]]:
    """Every leaf key as (dotted path, FieldInfo, owning model); list items appear as ``models[].name``."""
    for name, field in cls.model_fields.items():
        path = f"{prefix}{name}"
        nested = _model_class(field.annotation)
        if nested is not None and _is_list(field.annotation):
            yield from iter_fields(nested, f"{path}[].")
        elif nested is not None:
            yield from iter_fields(nested, f"{path}.")
        else:
            yield path, field, cls


# The orchestrator's reader of the ``runtime`` marker serves the sidecar's fields too (the marker is the same dict
# in both config modules); only the sidecar keeps a copy of it, since it may not import the orchestrator.
is_runtime = is_runtime_field


# ---------------------------------------------------------------------------------------------------------------
# Merging the sources


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set_path(doc: dict[str, Any], path: list[str], value: Any) -> None:
    node = doc
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _parse_scalar(raw: str) -> Any:
    """Environment and flag values stay strings (pydantic coerces them) unless they spell a list, a mapping or null."""
    text = raw.strip()
    if text[:1] in "[{" or text.lower() in ("null", "~"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse {raw!r} as YAML: {exc}") from exc
    return raw


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def env_overrides(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Config overrides from ``MUAI_<SECTION>__<KEY>`` variables, and which variable set each path.

    Variables without ``__`` (``MUAI_CONFIG``, ``MUAI_PROFILE``, ``MUAI_CACHE_DIR``) are settings of the CLI, not keys.
    """
    doc: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):]
        path = [p.lower() for p in rest.split(ENV_SEPARATOR)]
        if len(path) < 2 and path[0] not in MuaiConfig.model_fields:
            continue
        if path[0] not in MuaiConfig.model_fields:
            raise ConfigError(
                f"environment variable {name}: no configuration section {path[0]!r}"
                f"{_suggest(path[0], MuaiConfig.model_fields)}; sections: {', '.join(MuaiConfig.model_fields)}"
            )
        _set_path(doc, path, _parse_scalar(raw))
        origins[tuple(path)] = f"environment variable {name}"
    return doc, origins


def flag_overrides(assignments: Iterable[str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """``--set server.port=8001`` style overrides."""
    doc: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set server.port=8001")
        path = [p.strip() for p in key.split(".")]
        _set_path(doc, path, _parse_scalar(raw))
        origins[tuple(path)] = f"--set {key}"
    return doc, origins


def read_profile(name: str) -> dict[str, Any]:
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}{_suggest(name, PROFILES)}; profiles: {', '.join(PROFILES)}")
    text = resources.files("muai").joinpath("profiles", f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror or exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(doc).__name__}")
    return doc


# ---------------------------------------------------------------------------------------------------------------
# Validation with messages that name the key


def _describe_error(err: Mapping[str, Any], origins: Mapping[tuple[str, ...], str], file: str | None) -> str:
    loc = tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = model_at(loc[:-1])
        known = list(parent.model_fields) if parent else []
        hint = _suggest(str(loc[-1]), known)
        return f"unknown key {dotted!r}{hint}; allowed here: {', '.join(known)}"
    source = origins.get(tuple(str(p) for p in loc if not isinstance(p, int)))
    # A model-level error's input is the whole section: its secrets must not reach a log or a terminal.
    value = "***" if loc and str(loc[-1]) in SECRET_KEYS and err.get("input") else _scrub(err.get("input"))
    where = f" (from {source})" if source else (f" (in {file})" if file else "")
    message = f"{dotted} = {value!r}{where}: {err['msg']}"
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        message += f"; allowed: {ctx['expected']}"
    return f"{message}; override with {env_var_for(loc)}"


def validate(doc: Mapping[str, Any], *, origins: Mapping[tuple[str, ...], str] | None = None,
             file: str | None = None) -> MuaiConfig:
    try:
        return MuaiConfig.model_validate(doc)
    except ValidationError as exc:
        lines = [_describe_error(err, origins or {}, file) for err in exc.errors()]
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(lines)) from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    profile: str | None = None,
    overrides: Iterable[str] = (),
) -> MuaiConfig:
    """Load defaults < profile < file < environment < ``--set`` overrides and validate once."""
    env = os.environ if env is None else env
    path = path or env.get("MUAI_CONFIG") or None
    profile = profile or env.get("MUAI_PROFILE") or None
    doc: dict[str, Any] = {}
    if profile:
        doc = _deep_merge(doc, read_profile(profile))
    if path:
        doc = _deep_merge(doc, read_file(path))
    env_doc, origins = env_overrides(env)
    flag_doc, flag_origins = flag_overrides(overrides)
    doc = _deep_merge(_deep_merge(doc, env_doc), flag_doc)
    return validate(doc, origins={**origins, **flag_origins}, file=str(path) if path else None)


def _scrub(node: Any) -> Any:
    """``node`` with the values of ``SECRET_KEYS`` masked, at any depth."""
    if isinstance(node, Mapping):
        return {k: ("***" if k in SECRET_KEYS and v else _scrub(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_scrub(v) for v in node]
    return node


def redacted(config: MuaiConfig) -> dict[str, Any]:
    """The effective configuration as plain data, with secrets masked (for printing and the admin API)."""
    return _scrub(config.model_dump(mode="json"))


def dump_yaml(config: MuaiConfig) -> str:
    return yaml.safe_dump(redacted(config), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------
# Runtime updates


@dataclass(frozen=True)
class UpdateResult:
    config: MuaiConfig
    changed: list[str]

    def __iter__(self):  # allows ``new, changed = apply_update(...)``
        return iter((self.config, self.changed))


def _flatten_patch(patch: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    items: list[tuple[tuple[str, ...], Any]] = []
    for key, value in patch.items():
        # Only top-level keys are dotted; nested keys stay whole so a model name may contain dots.
        path = prefix + (tuple(str(key).split(".")) if not prefix else (str(key),))
        if isinstance(value, Mapping):
            items.extend(_flatten_patch(value, path))
        else:
            items.append((path, value))
    return items


ORCHESTRATOR_SECTIONS = ("engines", "models", "batching", "kv_cache", "server", "telemetry")


def apply_update(
    config: MuaiConfig, patch: Mapping[str, Any], *, sections: Iterable[str] | None = None
) -> UpdateResult:
    """Apply non-critical changes atomically; refuse the whole patch if any key is critical, unknown or invalid.

    ``patch`` is nested (``{"batching": {"max_batch_size": 8}}``) or dotted (``{"batching.max_batch_size": 8}``).
    Per-model keys are addressed by model name: ``{"models": {"tiny-llama": {"inject_delay_s": 0.5}}}``.
    ``sections`` limits the update to the sections the calling process applies (the orchestrator cannot apply the
    sidecar's keys, so accepting them would report a change that never happens).
    """
    if not isinstance(patch, Mapping) or not patch:
        raise ConfigUpdateError("the update must be a non-empty JSON object of keys to change")
    allowed = tuple(sections) if sections is not None else tuple(MuaiConfig.model_fields)
    doc = config.model_dump()
    changed: list[str] = []
    for path, value in _flatten_patch(patch):
        if path[0] in MuaiConfig.model_fields and path[0] not in allowed:
            raise ConfigUpdateError(
                f"{'.'.join(path)}: the {path[0]!r} section belongs to another process and cannot be changed here; "
                f"sections this process applies: {', '.join(allowed)}",
                key=".".join(path),
            )
        if path[0] == "models":
            if len(path) != 3:
                raise ConfigUpdateError(
                    "per-model keys are addressed as models.<name>.<key>", key=".".join(path)
                )
            _, model_name, key = path
            index = next((i for i, m in enumerate(doc["models"]) if m["name"] == model_name), None)
            if index is None:
                names = ", ".join(m["name"] for m in doc["models"])
                raise ConfigUpdateError(f"no model {model_name!r}; models: {names}", key=".".join(path))
            owner, target, leaf = ModelConfig, doc["models"][index], key
        else:
            owner = model_at(path[:-1])
            leaf = path[-1]
            target = doc
            for part in path[:-1]:
                target = target.get(part) if isinstance(target, dict) else None
            if owner is None or not isinstance(target, dict):
                raise ConfigUpdateError(f"unknown key {'.'.join(path)!r}", key=".".join(path))
        field = owner.model_fields.get(leaf)
        dotted = ".".join(path)
        if field is None:
            raise ConfigUpdateError(
                f"unknown key {dotted!r}{_suggest(leaf, owner.model_fields)}", key=dotted
            )
        if not is_runtime(field):
            raise ConfigUpdateError(
                f"{dotted} cannot change at runtime (it needs a restart); runtime keys: "
                + ", ".join(p for p, f, _ in iter_fields() if is_runtime(f)),
                key=dotted,
            )
        if target.get(leaf) != value:
            target[leaf] = value
            changed.append(dotted)
    try:
        new = validate(doc)
    except ConfigError as exc:
        raise ConfigUpdateError(str(exc)) from None
    return UpdateResult(new, changed)


__all__ = [
    "ORCHESTRATOR_SECTIONS",
    "PROFILES",
    "ConfigError",
    "ConfigUpdateError",
    "MuaiConfig",
    "UpdateResult",
    "apply_update",
    "default_models",
    "dump_yaml",
    "env_var_for",
    "iter_fields",
    "is_runtime",
    "load_config",
    "redacted",
]
