import pytest

from muai.config import (
    ConfigError,
    ConfigUpdateError,
    MuaiConfig,
    apply_update,
    dump_yaml,
    env_var_for,
    load_config,
    validate,
)


def write(tmp_path, text):
    path = tmp_path / "muai.yaml"
    path.write_text(text)
    return path


def test_defaults_validate_and_serve_the_embedded_models():
    config = load_config(env={})
    assert [m.name for m in config.models] == ["tiny-llama", "tiny-gpt2", "minilm"]
    assert config.server.host == "127.0.0.1"
    assert config.models[2].task == "embed"


def test_bad_env_value_names_key_value_and_variable():
    with pytest.raises(ConfigError) as err:
        load_config(env={"MUAI_SERVER__PORT": "notaport"})
    message = str(err.value)
    assert "server.port" in message and "'notaport'" in message and "MUAI_SERVER__PORT" in message


def test_out_of_range_value_says_what_is_allowed(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "server:\n  port: 70000\n"), env={})
    assert "less than or equal to 65535" in str(err.value)
    assert "server.port" in str(err.value)


@pytest.mark.parametrize(
    ("text", "suggestion"),
    [("servr:\n  port: 1\n", "server"), ("server:\n  prot: 1\n", "port"), ("batching:\n  max_batch_sise: 4\n", "max_batch_size")],
)
def test_misspelt_key_is_refused_with_a_suggestion(tmp_path, text, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), env={})
    assert f"did you mean {suggestion!r}" in str(err.value)


def test_precedence_flag_over_env_over_file_over_profile(tmp_path):
    path = write(tmp_path, "batching:\n  max_batch_size: 3\nserver:\n  port: 8100\n")
    config = load_config(path, profile="cpu-dev", env={"MUAI_SERVER__PORT": "8200"}, overrides=["server.queue_capacity=7"])
    assert config.batching.max_batch_size == 3  # file beats profile (cpu-dev says 8)
    assert config.server.port == 8200  # env beats file
    assert config.server.queue_capacity == 7  # flag beats profile
    assert config.engines.preference == ["onnxruntime", "torch"]  # from the profile


def test_env_override_lists_as_yaml():
    config = load_config(env={"MUAI_ENGINES__PREFERENCE": "[torch]", "MUAI_CACHE_DIR": "/tmp/x"})
    assert config.engines.preference == ["torch"]


def test_env_for_unknown_section_is_refused():
    with pytest.raises(ConfigError, match="did you mean 'server'"):
        load_config(env={"MUAI_SERVR__PORT": "1"})


@pytest.mark.parametrize("profile", ["cpu-dev", "single-gpu", "multi-gpu"])
def test_every_profile_validates(profile):
    assert isinstance(load_config(profile=profile, env={}), MuaiConfig)


def test_unknown_profile_suggests():
    with pytest.raises(ConfigError, match="single-gpu"):
        load_config(profile="single_gpu", env={})


def test_cross_field_rule_is_reported():
    with pytest.raises(ConfigError, match="min_batch_size"):
        load_config(env={"MUAI_BATCHING__MIN_BATCH_SIZE": "64", "MUAI_BATCHING__MAX_BATCH_SIZE": "8"})


@pytest.mark.parametrize(("models", "engines", "message"), [
    ("[{name: m, path: x, engine: torch, pipeline_parallel_size: 2}]", "",
     "models[0].pipeline_parallel_size = 2 needs the vllm engine"),
    ("[{name: m, path: x, tensor_parallel_size: 2}]", "  preference: [onnxruntime, torch]\n",
     "models[0].tensor_parallel_size = 2 needs vllm or deepspeed, but engines.preference is"),
    ("[{name: m, path: x, pipeline_parallel_size: 2}]", "  vllm:\n    enabled: false\n",
     "engines.vllm.enabled = False"),
])
def test_a_parallel_layout_no_engine_of_the_model_can_run_is_refused_naming_the_keys(tmp_path, models, engines, message):
    text = f"models: {models}\n" + (f"engines:\n{engines}" if engines else "")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, text), env={})
    fine = load_config(write(tmp_path, "models: [{name: m, path: x, tensor_parallel_size: 2, pipeline_parallel_size: 2}]\n"),
                       env={})
    assert (fine.models[0].tensor_parallel_size, fine.models[0].pipeline_parallel_size) == (2, 2)


def test_secrets_are_redacted_in_printed_config():
    config = load_config(env={"MUAI_SERVER__ADMIN_TOKEN": "s" * 20})
    assert "s" * 20 not in dump_yaml(config)
    assert config.server.admin_token == "s" * 20


def test_secrets_never_appear_in_error_messages():
    # A bad token itself, and a section whose whole input (token included) is quoted by the error.
    with pytest.raises(ConfigError) as bad_token:
        load_config(env={"MUAI_SERVER__ADMIN_TOKEN": "short-secret"})
    assert "short-secret" not in str(bad_token.value) and "server.admin_token = '***'" in str(bad_token.value)
    with pytest.raises(ConfigError) as bad_section:
        validate({"server": [{"admin_token": "t" * 20, "port": 1}]})
    assert "t" * 20 not in str(bad_section.value) and "'admin_token': '***'" in str(bad_section.value)


def test_env_var_names():
    assert env_var_for(("telemetry", "tracing", "sampling_ratio")) == "MUAI_TELEMETRY__TRACING__SAMPLING_RATIO"
    assert env_var_for(("models", 0, "name")) == "MUAI_MODELS"


class TestRuntimeUpdate:
    def test_runtime_keys_change_atomically(self):
        config = load_config(env={})
        new, changed = apply_update(config, {"batching": {"max_batch_size": 4}, "server.queue_capacity": 9})
        assert new.batching.max_batch_size == 4 and new.server.queue_capacity == 9
        assert sorted(changed) == ["batching.max_batch_size", "server.queue_capacity"]
        assert config.batching.max_batch_size == 16  # the original is frozen and untouched

    def test_critical_key_is_refused_with_reason_and_nothing_changes(self):
        config = load_config(env={})
        with pytest.raises(ConfigUpdateError) as err:
            apply_update(config, {"batching.max_batch_size": 4, "server.port": 9000})
        assert err.value.key == "server.port"
        assert "restart" in str(err.value)

    def test_invalid_value_is_refused(self):
        with pytest.raises(ConfigUpdateError, match="max_batch_size"):
            apply_update(load_config(env={}), {"batching": {"max_batch_size": 0}})

    def test_unknown_key_suggests(self):
        with pytest.raises(ConfigUpdateError, match="did you mean 'batch_timeout_s'"):
            apply_update(load_config(env={}), {"batching": {"batch_timeout": 1}})

    def test_per_model_keys_by_name(self):
        new, changed = apply_update(load_config(env={}), {"models": {"tiny-llama": {"inject_delay_s": 0.25}}})
        assert new.model("tiny-llama").inject_delay_s == 0.25
        assert changed == ["models.tiny-llama.inject_delay_s"]
        with pytest.raises(ConfigUpdateError, match="no model 'nope'"):
            apply_update(new, {"models": {"nope": {"inject_delay_s": 0}}})

    def test_sections_of_another_process_are_refused(self):
        from muai.config import ORCHESTRATOR_SECTIONS

        config = load_config(env={})
        with pytest.raises(ConfigUpdateError, match="belongs to another process") as err:
            apply_update(config, {"sidecar": {"port": 1}}, sections=ORCHESTRATOR_SECTIONS)
        assert err.value.key == "sidecar.port"
        new, changed = apply_update(config, {"batching.max_batch_size": 2}, sections=ORCHESTRATOR_SECTIONS)
        assert changed == ["batching.max_batch_size"]

    def test_sampling_ratio_is_runtime(self):
        new, _ = apply_update(load_config(env={}), {"telemetry": {"tracing": {"sampling_ratio": 0.5}}})
        assert new.telemetry.tracing.sampling_ratio == 0.5


def test_every_runtime_key_of_the_orchestrator_has_an_applier():
    # The ``runtime`` markers are the one source of which keys may change while serving; a key marked runtime with
    # nothing that applies it would be accepted by PATCH /admin/config and then silently not take effect.
    from muai.config import ORCHESTRATOR_SECTIONS, is_runtime, iter_fields
    from orchestrator.runtime_config import APPLIERS

    marked = {path for path, field, _ in iter_fields()
              if is_runtime(field) and path.split(".")[0].removesuffix("[]") in ORCHESTRATOR_SECTIONS}
    assert marked == set(APPLIERS)
