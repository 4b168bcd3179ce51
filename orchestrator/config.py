"""The orchestrator's configuration sections.

Each key is typed, bounded and documented; unknown keys are refused. Keys marked ``runtime`` (via
``json_schema_extra={"runtime": True}``) may be changed while serving through the admin API; every other key is
critical and needs a restart. ``docs/configuration.md`` documents every key and a test keeps it in step.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from orchestrator.tls import insecure_admin_problem

ENGINE_NAMES = ("vllm", "deepspeed", "onnxruntime", "torch")
EngineName = Literal["vllm", "deepspeed", "onnxruntime", "torch", "echo"]

RUNTIME = {"runtime": True}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class TorchEngineConfig(Section):
    """Plain PyTorch / transformers: the engine every other one falls back to."""

    enabled: bool = Field(True, description="Offer this engine in the fallback chain.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; unset keeps torch's default.")
    packed_linear: bool = Field(
        True, description="On the CPU, run float32 linear layers of 256K weights or more on oneDNN over weights packed "
        "at load (1.3-2.7x faster per forward on a 100M-parameter model; outputs bit-identical across row counts).",
    )


class OnnxEngineConfig(Section):
    """ONNX Runtime: models converted with the dynamo exporter and validated against PyTorch before serving."""

    enabled: bool = Field(True, description="Offer this engine in the fallback chain.")
    providers: list[str] = Field(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        min_length=1,
        description="Execution providers in order of preference, filtered by what onnxruntime offers here.",
    )
    validation_tolerance: float = Field(
        1e-3, gt=0, description="Largest absolute logit difference vs PyTorch accepted when validating a conversion."
    )
    cache_dir: str | None = Field(
        None, description="Where converted models are cached; default: <MUAI_CACHE_DIR or ~/.cache/muai>/onnx."
    )
    intra_op_threads: int | None = Field(None, ge=1, description="ORT intra-op threads; unset: 1 for a model narrower than 512, else ORT's default.")


class DeepSpeedEngineConfig(Section):
    """DeepSpeed inference (`init_inference`): tensor parallelism and kernel injection."""

    enabled: bool = Field(True, description="Offer this engine in the fallback chain.")
    tensor_parallel_size: int = Field(1, ge=1, description="AutoTP degree (ranks); >1 needs the deepspeed launcher.")
    replace_with_kernel_inject: bool = Field(False, description="Use DeepSpeed's fused kernels (GPU only).")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Inference dtype.")


class VllmEngineConfig(Section):
    """vLLM's async engine: continuous batching, PagedAttention, prefix caching."""

    enabled: bool = Field(True, description="Offer this engine in the fallback chain.")
    tensor_parallel_size: int | None = Field(
        None, ge=1, description="Tensor parallel degree; unset means the number of visible GPUs (1 on CPU)."
    )
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline parallel degree.")
    kv_cache_memory_bytes: int = Field(
        512 * 1024**2, ge=16 * 1024**2, description="KV-cache size, always explicit (on CPU vLLM otherwise takes a share of all RAM)."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of repeated prompt prefixes.")
    enforce_eager: bool = Field(True, description="Skip graph compilation: engine start in seconds instead of a minute on CPU.")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of GPU memory vLLM may use (GPU only).")
    max_model_len: int | None = Field(None, ge=16, description="Context length cap; unset uses the model's.")
    otlp_traces_endpoint: str | None = Field(
        None, pattern=r"^https?://",
        description="Let vLLM export its own `llm_request` spans here (e.g. the sidecar's /v1/traces), parented to "
        "ours through the trace headers it is given; unset: vLLM exports nothing.",
    )


class EnginesConfig(Section):
    """Which engines may serve, in order of preference, and each engine's settings."""

    preference: list[EngineName] = Field(
        ["vllm", "deepspeed", "onnxruntime", "torch"],
        min_length=1,
        description="Engines tried in order; unavailable ones are skipped, failing ones fall back to the next.",
    )
    reprobe_after_s: float = Field(
        60.0, gt=0, description="After an engine fails, try it again for a model after this long (doubling, capped at 1 h)."
    )
    resident_budget_bytes: int | None = Field(
        None, ge=1,
        description="Bytes of model weights (their files on disk) that may be loaded at once. Loading past it first "
        "unloads the least recently used models that are neither `preload` nor `required`; such a model loads again "
        "on its next request. Unset: no limit.",
    )
    torch: TorchEngineConfig = TorchEngineConfig()
    onnxruntime: OnnxEngineConfig = OnnxEngineConfig()
    deepspeed: DeepSpeedEngineConfig = DeepSpeedEngineConfig()
    vllm: VllmEngineConfig = VllmEngineConfig()

    @model_validator(mode="after")
    def _no_duplicates(self) -> EnginesConfig:
        if len(set(self.preference)) != len(self.preference):
            raise ValueError(f"engines.preference lists an engine twice: {self.preference}")
        return self


class ModelConfig(Section):
    """One model the orchestrator serves."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$", description="Name clients use in requests.")
    path: str = Field(..., min_length=1, description="Directory in transformers' save_pretrained layout; `builtin:NAME` for an embedded default.")
    task: Literal["generate", "embed"] = Field("generate", description="`generate` for causal LMs, `embed` for encoders.")
    engine: EngineName | None = Field(None, description="Force one engine (still falls back to torch on failure).")
    preload: bool = Field(True, description="Load before readiness turns 200.")
    required: bool = Field(True, description="Readiness is 503 while a required model cannot be served.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="`auto`, `cpu`, `cuda` or `cuda:N`.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Weights dtype.")
    max_model_len: int | None = Field(None, ge=16, description="Context cap; unset uses the model's.")
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="Ranks that split each layer (vLLM, DeepSpeed AutoTP); above 1 it overrides the "
        "engine's own setting. Needs one of those engines in the model's preference.",
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, le=64, description="Stages that split the layers (vLLM only; on CPU one rank per core). Needs vllm in "
        "the model's preference.",
    )
    replicas: int = Field(
        1, ge=1, le=64,
        description="Engine instances serving this model, each its own fallback chain; requests go to the one with "
        "the fewest outstanding, and one that fails takes no new work for `engines.reprobe_after_s`.",
    )
    inject_delay_s: float = Field(
        0.0, ge=0, le=60, description="Test hook: sleep this long before each inference (drills for slowdown alerts).",
        json_schema_extra=RUNTIME,
    )


class BatchingConfig(Section):
    """The dynamic batcher (engines without continuous batching of their own)."""

    enabled: bool = Field(True, description="When false, every request runs on its own.")
    max_batch_size: int = Field(16, ge=1, le=1024, description="Batch size threshold that dispatches at once.", json_schema_extra=RUNTIME)
    min_batch_size: int = Field(1, ge=1, le=1024, description="Lower bound for the adaptive batch size.", json_schema_extra=RUNTIME)
    batch_timeout_s: float = Field(
        0.005, ge=0, le=10, description="Longest the oldest request of a batch waits for company.", json_schema_extra=RUNTIME
    )
    adaptive: bool = Field(True, description="Grow/shrink the batch size with the queue depth.", json_schema_extra=RUNTIME)
    length_bucketing: bool = Field(False, description="Group prompts of similar length to limit padding.", json_schema_extra=RUNTIME)

    @model_validator(mode="after")
    def _bounds(self) -> BatchingConfig:
        if self.min_batch_size > self.max_batch_size:
            raise ValueError(f"batching.min_batch_size ({self.min_batch_size}) exceeds batching.max_batch_size ({self.max_batch_size})")
        return self


class KvCacheConfig(Section):
    """Multi-turn KV-cache reuse (torch engine; vLLM uses its own prefix cache)."""

    enabled: bool = Field(True, description="Keep each conversation's key/value state between turns.")
    budget_bytes: int = Field(
        256 * 1024**2, ge=0, description="Bytes all cached conversations may hold together; LRU evicts past it.",
        json_schema_extra=RUNTIME,
    )
    idle_ttl_s: float = Field(1800.0, gt=0, description="Drop a conversation idle this long.", json_schema_extra=RUNTIME)


class TlsConfig(Section):
    """HTTPS on the orchestrator's listeners (the main port and `telemetry.metrics.port`): both files, or neither."""

    cert_file: str | None = Field(None, description="PEM certificate (chain) the server presents; with `key_file`, turns HTTPS on.")
    key_file: str | None = Field(None, description="PEM private key of `cert_file`.")

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @model_validator(mode="after")
    def _both_or_neither(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("server.tls.cert_file and server.tls.key_file go together: set both, or neither")
        return self


class ServerConfig(Section):
    """The orchestrator's HTTP server."""

    host: str = Field("127.0.0.1", description="Listen address.")
    port: int = Field(8000, ge=1, le=65535, description="Listen port.")
    queue_capacity: int = Field(256, ge=1, description="Admitted requests (queued + running) before 429.", json_schema_extra=RUNTIME)
    max_running_per_model: int | None = Field(
        None, ge=1, le=100_000,
        description="Requests of one model inside an engine that batches by itself (vLLM) at once; the rest wait in "
        "our queue. Unset: no limit (the engine takes everything). Engines behind our batcher get two batches' worth.",
        json_schema_extra=RUNTIME,
    )
    max_queue_wait_s: float | None = Field(
        None, gt=0, le=3600,
        description="Admission by waiting time: while the oldest request of a model still waiting for a running slot "
        "has waited longer than this, new requests for that model get 429 with Retry-After (the queue is FIFO, so that "
        "is the wait they would face). Unset: off, only queue_capacity bounds admission. The tuner sets it from the "
        "latency objective.",
        json_schema_extra=RUNTIME,
    )
    request_timeout_s: float = Field(120.0, gt=0, description="Per-request limit; past it the client gets 504.", json_schema_extra=RUNTIME)
    max_body_bytes: int = Field(4 * 1024**2, ge=1024, description="Largest request body; larger gets 413.")
    drain_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM, how long admitted requests may take to finish.")
    stuck_after_s: float = Field(
        60.0, gt=0,
        description="Readiness turns 503 when requests are in flight but no token or result came out for this long "
        "(timeouts and cancellations are not output). A non-streamed generation longer than this also reads as stuck: "
        "set it above your longest non-streamed generation.",
        json_schema_extra=RUNTIME,
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After header on 429 and 503.")
    admin_token: str | None = Field(None, min_length=16, description="Bearer token for /admin; unset turns the admin API off.")
    pid_file: str | None = Field(None, description="Write the server's PID here (the sidecar finds the process by it).")
    tls: TlsConfig = TlsConfig()
    allow_insecure_admin: bool = Field(
        False, description="Start with the admin API on (`admin_token` set) on a `host` beyond loopback without TLS; "
        "only behind a TLS-terminating proxy. Without it such a start is refused.",
    )

    # A field validator on the last of the fields it reads (not a model validator): its error then shows this one
    # boolean, not the whole section with the token in it.
    @field_validator("allow_insecure_admin")
    @classmethod
    def _admin_token_stays_encrypted(cls, allowed: bool, info: ValidationInfo) -> bool:
        tls = info.data.get("tls")
        problem = insecure_admin_problem(
            section="server", host=info.data.get("host", "127.0.0.1"), token_key="server.admin_token",
            token_set=info.data.get("admin_token") is not None, tls_on=tls is not None and tls.enabled, allowed=allowed,
        )
        if problem:
            raise ValueError(problem)
        return allowed


class MetricsConfig(Section):
    """Prometheus metrics."""

    enabled: bool = Field(True, description="Expose Prometheus metrics.")
    path: str = Field("/metrics", pattern=r"^/", description="Path of the metrics endpoint.")
    port: int | None = Field(None, ge=1, le=65535, description="Separate metrics port; unset serves on the main port.")
    host: str = Field("127.0.0.1", description="Listen address of the separate metrics port.")
    resource_interval_s: float = Field(5.0, gt=0, description="How often GPU/CPU/memory gauges are sampled.")


class TracingConfig(Section):
    """OpenTelemetry traces exported over OTLP."""

    enabled: bool = Field(True, description="Record and export traces.")
    endpoint: str = Field("http://127.0.0.1:4318/v1/traces", description="OTLP endpoint (the collector or the sidecar).")
    protocol: Literal["http/protobuf", "grpc"] = Field("http/protobuf", description="OTLP transport.")
    sampling_ratio: float = Field(
        1.0, ge=0, le=1, description="Probability of sampling a new trace while traffic is below the budget "
        "(consistent probability sampling; a sampled incoming traceparent is always followed).", json_schema_extra=RUNTIME
    )
    sampling_budget_per_s: float | None = Field(
        100.0, gt=0, description="Sampled new traces per second above which the probability falls to keep about this "
        "many (each span carries its threshold, `ot=th:`, so the sidecar weights it by 1/p); null: a fixed ratio.",
    )
    service_name: str = Field("muai-orchestrator", min_length=1, description="`service.name` resource attribute.")
    export_timeout_s: float = Field(5.0, gt=0, description="OTLP export timeout.")
    max_queue_size: int = Field(2048, ge=1, description="Spans buffered before dropping (never blocks serving).")
    ca_file: str | None = Field(
        None, description="PEM CA bundle that verifies an https `endpoint` (e.g. a sidecar with `sidecar.tls.*` and a "
        "self-signed certificate); unset: the system's trust store.",
    )


class TelemetryConfig(Section):
    """Metrics and traces."""

    metrics: MetricsConfig = MetricsConfig()
    tracing: TracingConfig = TracingConfig()


__all__ = [
    "ENGINE_NAMES",
    "BatchingConfig",
    "DeepSpeedEngineConfig",
    "EngineName",
    "EnginesConfig",
    "KvCacheConfig",
    "MetricsConfig",
    "ModelConfig",
    "OnnxEngineConfig",
    "ServerConfig",
    "TelemetryConfig",
    "TlsConfig",
    "TorchEngineConfig",
    "TracingConfig",
    "VllmEngineConfig",
]
