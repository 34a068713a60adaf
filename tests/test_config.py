"""Config: TOML file, environment overrides, CLI overrides, systemd directories, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import pytest
from pydantic import TypeAdapter, ValidationError

from agent.config import Config, load_config
from agent.errors import ConfigError
from agent.pipelines.base import Registry
from agent.pipelines.options import Overrides, ProcessorOptions
from agent.validation import path_fields, type_tags


def test_defaults_work_without_a_file(tmp_path):
    cfg = load_config(environ={"HOME": str(tmp_path)})
    assert cfg.api.tcp is None, "TCP listener is off by default"
    assert cfg.api.socket_mode == 0o660
    assert cfg.socket_path.name == "agent.sock"
    assert cfg.models_dir == cfg.agent.state_dir / "models"
    assert cfg.model_options("anything").batching.enabled is False


def test_systemd_directories_are_honoured(monkeypatch, tmp_path):
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    monkeypatch.setenv("RUNTIME_DIRECTORY", f"{tmp_path / 'run'}:{tmp_path / 'other'}")
    cfg = load_config()
    assert cfg.agent.state_dir == tmp_path / "state"
    assert cfg.socket_path == tmp_path / "run" / "agent.sock"
    assert cfg.models_dir == tmp_path / "state" / "models"


def test_file_env_and_overrides_in_order(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[api]\nsocket = "rel/agent.sock"\nmax_body_bytes = 1000\n'
                    '[model.vad.batching]\nenabled = true\nmax_batch_size = 8\n')
    cfg = load_config(path, environ={"EDGE_AGENT_API__MAX_BODY_BYTES": "2000",
                                     "EDGE_AGENT_AGENT__DEVICE_ID": "cam-01"})
    assert cfg.api.socket == tmp_path / "rel" / "agent.sock", "relative paths are relative to the file"
    assert cfg.api.max_body_bytes == 2000 and cfg.agent.device_id == "cam-01"
    assert cfg.model_options("vad").batching.max_batch_size == 8
    cfg = load_config(path, overrides={"api.socket": "/x.sock", "api.tcp": None}, environ={})
    assert cfg.api.socket == Path("/x.sock") and cfg.api.max_body_bytes == 1000


@pytest.mark.parametrize(("text", "env", "key", "fragment"), [
    ("[api]\nmax_body_bytes = 'big'\n", {}, "api.max_body_bytes", "valid integer"),
    ("[api]\nsockett = '/x'\n", {}, "api.sockett", "unknown key"),
    ("[api]\ntcp = 'localhost'\n", {}, "api.tcp", "HOST:PORT"),
    ("[model.vad.batching]\nmax_batch_size = 0\n", {}, "model.vad.batching.max_batch_size", "greater than"),
    ("[model.'bad name']\n", {}, "model", "invalid model name"),
    ("[logging]\nlevel = 'loud'\n", {}, "logging.level", "'debug'"),
    ("", {"EDGE_AGENT_API__SOCKET_MODE": "'x'"}, "api.socket_mode", "valid integer"),
])
def test_errors_name_file_key_and_reason(tmp_path, text, env, key, fragment):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ=env)
    message = str(err.value)
    assert err.value.key == key and f"key '{key}'" in message and fragment in message
    where = next(iter(env)) if env else str(path)
    assert where in message


def test_malformed_and_missing_file(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text("[api\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(("text", "key"), [
    ("[api]\nmax_body_bytes = -5\n", "api.max_body_bytes"),
    ('[stream.cam]\nmodel = "m"\nsource = { type = "video", path = "a.avi", lop = true }\n', "stream.cam.source.lop"),
])
def test_broken_config_stops_startup_with_one_line_and_exit_2(tmp_path, text, key):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(path)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and str(path) in lines[0]


# --- streams: source, pre and post are checked at load ------------------------------------------------------------

STREAM = '[stream.cam]\nmodel = "face"\nsource = { type = "video", path = "clip.avi" }\n'


def stream_config(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return load_config(path, environ=env or {})


@pytest.mark.parametrize(("text", "key", "fragments"), [
    ('[stream.cam]\nmodel = "m"\nsource = { type = "video", path = "a.avi", lop = true }\n',
     "stream.cam.source.lop", ["unknown key"]),
    ('[stream.cam]\nmodel = "m"\nsource = { type = "video", path = "a.avi", fps = 0 }\n',
     "stream.cam.source.fps", ["greater than 0"]),
    ('[stream.cam]\nmodel = "m"\nsource = { type = "camera", device = -1 }\n',
     "stream.cam.source.device", [">= 0"]),
    ('[stream.cam]\nmodel = "m"\nsource = { type = "webcam" }\n',
     "stream.cam.source.type", ["unknown type 'webcam' (known: alsa, camera, images, pcm, video, wav)"]),
    ('[stream.cam]\nmodel = "m"\nsource = { path = "a.avi" }\n', "stream.cam.source.type", ["required"]),
    ('[stream.cam]\nmodel = "m"\n', "stream.cam.source", ["required"]),
    (STREAM + 'pre = { colour = "bgr" }\n', "stream.cam.pre.colour", ["no pre-processing type has this option"]),
    (STREAM + 'pre = { resize = "crop" }\n', "stream.cam.pre.resize", ["'stretch'", "'letterbox'"]),
    (STREAM + 'pre = { size = [128] }\n', "stream.cam.pre.size", ["at least 2"]),
    (STREAM + 'pre = { type = "image", window = 512 }\n', "stream.cam.pre.window", ["unknown key"]),
    (STREAM + 'pre = { type = "imag" }\n', "stream.cam.pre.type", ["unknown type 'imag' (known: audio, image)"]),
    (STREAM + 'pre = { features = { type = "log_mel", n_ftt = 400 } }\n', "stream.cam.pre.features.n_ftt",
     ["unknown key"]),
    (STREAM + 'pre = { features = "mfcc" }\n', "stream.cam.pre.features", ["none, log_mel or micro_frontend"]),
    (STREAM + "post = { scor_threshold = 0.5 }\n", "stream.cam.post.scor_threshold",
     ["no post-processing type has this option"]),
    (STREAM + 'post = { type = "detection", iou_threshold = 2 }\n', "stream.cam.post.iou_threshold",
     ["less than or equal to 1"]),
    (STREAM + 'post = { type = "threshold" }\n', "stream.cam.post.type", ["unknown type 'threshold'"]),
    (STREAM + "post = { top_k = true }\n", "stream.cam.post.top_k", ["valid integer"]),
])
def test_stream_typos_are_refused_at_load_naming_the_key(tmp_path, text, key, fragments):
    with pytest.raises(ConfigError) as err:
        stream_config(tmp_path, text)
    message = str(err.value)
    assert err.value.key == key and f"key '{key}'" in message and str(tmp_path / "agent.toml") in message, message
    assert all(f in message for f in fragments), message


def test_stream_option_from_the_environment_is_checked_and_named(tmp_path):
    env = {"EDGE_AGENT_STREAM__CAM__SOURCE__FPS": "'fast'"}
    with pytest.raises(ConfigError) as err:
        stream_config(tmp_path, STREAM, env)
    assert err.value.key == "stream.cam.source.fps" and "EDGE_AGENT_STREAM__CAM__SOURCE__FPS" in str(err.value)
    cfg = stream_config(tmp_path, STREAM, {"EDGE_AGENT_STREAM__CAM__SOURCE__REALTIME": "true"})
    assert cfg.stream["cam"].source.realtime is True  # type: ignore[attr-defined]


def test_partial_pre_and_post_override_the_manifest_as_written(tmp_path):
    cfg = stream_config(tmp_path, STREAM + 'pre = { size = [128, 128], resize = "letterbox" }\n'
                                           "post = { score_threshold = 0.6 }\n")
    stream = cfg.stream["cam"]
    assert stream.pre == {"size": [128, 128], "resize": "letterbox"}  # merged with the manifest key by key
    assert stream.post == {"score_threshold": 0.6}
    assert stream.source.type == "video" and stream.source.loop is False  # type: ignore[attr-defined]
    cfg = stream_config(tmp_path, STREAM + 'pre = { type = "audio", window = 512, features = "log_mel" }\n')
    assert cfg.stream["cam"].pre == {"type": "audio", "window": 512, "features": "log_mel"}


def test_relative_snapshot_dir_and_source_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    conf = tmp_path / "etc"
    conf.mkdir()
    text = (
        '[stream.video]\nmodel = "m"\nsource = { type = "video", path = "clips/a.avi" }\nsnapshot_dir = "snaps"\n'
        '[stream.rtsp]\nmodel = "m"\nsource = { type = "video", path = "rtsp://cam.local/live" }\n'
        '[stream.images]\nmodel = "m"\nsource = { type = "images", path = "photos" }\n'
        '[stream.wav]\nmodel = "m"\nsource = { type = "wav", path = "../speech.wav" }\n'
        '[stream.stdin]\nmodel = "m"\nsource = { type = "pcm", path = "-", sample_rate = 16000 }\n'
        '[stream.fifo]\nmodel = "m"\nsource = { type = "pcm", path = "/dev/stdin", sample_rate = 16000 }\n'
        '[stream.home]\nmodel = "m"\nsource = { type = "wav", path = "~/a.wav" }\nsnapshot_dir = "/var/snaps"\n'
        '[stream.cam]\nmodel = "m"\nsource = { type = "camera", device = "/dev/video2" }\n'
    )
    cfg = stream_config(conf, text)
    paths = {name: getattr(s.source, "path", None) for name, s in cfg.stream.items()}
    assert paths == {
        "video": str(conf / "clips" / "a.avi"),
        "rtsp": "rtsp://cam.local/live",
        "images": str(conf / "photos"),
        "wav": str(conf / ".." / "speech.wav"),
        "stdin": "-",
        "fifo": "/dev/stdin",
        "home": str(Path("~/a.wav").expanduser()),
        "cam": None,
    }
    assert cfg.stream["cam"].source.device == "/dev/video2"  # type: ignore[attr-defined]
    assert cfg.stream["video"].snapshot_dir == conf / "snaps"
    assert cfg.stream["home"].snapshot_dir == Path("/var/snaps")
    # Environment overrides stay relative to the working directory, as for every other path.
    cfg = stream_config(conf, STREAM, {"EDGE_AGENT_STREAM__CAM__SNAPSHOT_DIR": "snaps"})
    assert cfg.stream["cam"].snapshot_dir == Path("snaps")
    assert cfg.stream["cam"].source.path == str(conf / "clip.avi")  # type: ignore[attr-defined]


def test_every_path_field_resolves_against_the_config_file():
    """A field holding a Path must be typed ConfigPath (or PathStr/PathOrUrl): nothing hand-listed to forget."""
    fields = dict(path_fields(Config))
    assert {"agent.state_dir", "api.socket", "mqtt.ca_file", "stream.*.snapshot_dir", "stream.*.source.path"} <= set(
        fields
    ), fields
    assert [f for f, marked in fields.items() if not marked] == []


def test_a_config_without_streams_does_not_import_the_pipeline_parts(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[api]\ntcp = "127.0.0.1:8500"\n')
    code = (f"import sys; from agent.config import load_config; load_config({str(path)!r}, environ={{}}); "
            "print(sorted(m for m in sys.modules if m.startswith('agent.pipelines') or m in ('numpy', 'cv2')))")
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]"


def test_the_config_unions_hold_every_registered_type():
    """The unions are built from the registries: a registered part cannot be missing from the config."""
    from agent.pipelines import catalog
    from agent.pipelines.base import POSTPROCESSORS, PREPROCESSORS, SOURCES

    def tags(union: Any) -> set[str]:
        members = get_args(get_args(union)[0]) if get_origin(union) is Annotated else get_args(union)
        return {t for m in members for t in type_tags(m)}

    assert tags(catalog.SourceConfig) == set(SOURCES) >= {"video", "camera", "images", "wav", "pcm", "alsa"}
    assert tags(catalog.PreprocessConfig) == set(PREPROCESSORS) >= {"image", "audio"}
    assert tags(catalog.PostprocessConfig) == set(POSTPROCESSORS) >= {"classification", "raw", "detection", "vad",
                                                                       "wake_word"}
    assert set(catalog.PRE_OVERRIDES.partials) == set(PREPROCESSORS)
    assert set(catalog.POST_OVERRIDES.partials) == set(POSTPROCESSORS)
    for kind, cls in SOURCES.items():  # each validates through the union to its own options
        options = TypeAdapter(catalog.SourceConfig).validate_python(
            {"type": kind, **({"path": "x"} if "path" in cls.Options.model_fields else {}),
             **({"sample_rate": 16000} if kind == "pcm" else {})})
        assert type(options) is cls.Options


def test_a_new_part_registers_once_and_is_in_its_union():
    registry: Registry[Any] = Registry("test")

    class GoodOptions(ProcessorOptions):
        type: Literal["good"]
        level: int = 1

    class Good:
        type = "good"
        Options = GoodOptions

    class Bad:
        type = "bad"
        Options = GoodOptions

    registry.register(Good)
    with pytest.raises(TypeError, match=r"Bad\.Options needs a field type: Literal"):
        registry.register(Bad)
    overrides = Overrides(registry, "test")
    assert overrides({"level": 2}) == {"level": 2}
    with pytest.raises(ValidationError):
        overrides({"lvel": 2})
    assert TypeAdapter(registry.options_union()).validate_python({"type": "good"}) == GoodOptions(type="good")
