"""Streaming pipelines in a real daemon: a video of photos through face detection, speech
through Silero VAD, results over Server-Sent Events and MQTT, bad sources, run-time control
and a model switch under a running stream."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import install, start_daemon, wait_for
from tests.media import make_video, photo_frames, speech_wav

FACE_PRE = '{ type = "image", resize = "letterbox", scale = 0.00784313725, offset = -1.0 }'
FACE_POST = '{ type = "detection", format = "mediapipe_ssd", score_threshold = 0.6 }'
VAD_PRE = ('{ type = "audio", sample_rate = 16000, window = 512, context = 64, '
           'state = { input = "state", output = "stateN", shape = [2, 1, 128] }, constants = { sr = 16000 } }')


def sse(sock_path: Path, stream: str, count: int, timeout: float = 30.0) -> list[dict]:
    """Read ``count`` results from the local live feed (a raw HTTP client, as curl would)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(str(sock_path))
    s.sendall(f"GET /v1/agent/streams/{stream}/results HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    buf, events = b"", []
    deadline = time.monotonic() + timeout
    try:
        while len(events) < count and time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                for line in block.split(b"\n"):
                    if line.startswith(b"data: "):
                        events.append(json.loads(line[6:]))
    finally:
        s.close()
    assert b"text/event-stream" in buf or events, "an SSE response"
    return events[:count]  # the last chunk read may hold more than were asked for


def stream_status(daemon, name: str) -> dict:
    return next(s for s in daemon.client.status()["streams"] if s["name"] == name)




def load_voice(path: Path):
    import wave


    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768


def vad_events_over_mqtt(tmp_path: Path, samples, broker, wav: Path, device: str, post: str) -> tuple[list, object]:
    """Run a Silero VAD stream over ``wav`` in a real daemon; the results as the fleet receives them."""
    from cloud_sync.fleet.console import FleetClient
    from cloud_sync.mqtt.settings import BrokerSettings

    install(tmp_path / "models", samples, "silero_vad")
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[agent]
device_id = "{device}"
[mqtt]
url = "{broker.url}"
[stream.mic]
model = "silero_vad"
source = {{ type = "wav", path = "{wav}", realtime = false }}
pre = {VAD_PRE}
post = {post}
autostart = false
""")
    daemon = start_daemon(tmp_path / "agent", "--config", str(config), "--models-dir", str(tmp_path / "models"))
    events: list = []
    try:
        with FleetClient(BrokerSettings(url=broker.url)) as fleet:
            fleet.subscribe([f"edge/v1/devices/{device}/results/#"])
            status, _, body = daemon.client.request("POST", "/v1/agent/streams/mic:start", b"")
            assert status == 200, body
            for msg in fleet.messages(30):
                events.append(json.loads(msg.payload))
                if events[-1].get("event") == "speech_end":
                    break
        wait_for(lambda: stream_status(daemon, "mic")["state"] == "ended", what="finite source ends")
        return events, stream_status(daemon, "mic")
    finally:
        assert daemon.stop() == 0


@pytest.fixture
def face_video(tmp_path, samples) -> tuple[Path, list]:
    frames, placements = photo_frames(samples["astronaut"], n=20, size=(320, 240), scales=(0.9, 0.9))
    return make_video(tmp_path / "faces.avi", frames, fps=10), placements


def test_video_stream_detects_faces_and_streams_results(tmp_path, samples, face_video):
    video, placements = face_video
    face = (180, 82, 274, 176)  # the astronaut's face in the 512x512 photo, checked by hand
    install(tmp_path / "models", samples, "face_detection")
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[stream.cam]
model = "face_detection"
source = {{ type = "video", path = "{video}", loop = true, realtime = true }}
pre = {FACE_PRE}
post = {FACE_POST}
snapshot_dir = "{tmp_path / 'snaps'}"
snapshot_max_bytes = 200000
""")
    daemon = start_daemon(tmp_path / "agent", "--config", str(config), "--models-dir", str(tmp_path / "models"))
    try:
        results = sse(daemon.socket, "cam", 8)
        assert len(results) == 8
        with_faces = [r for r in results if r["detections"]]
        assert len(with_faces) >= 6, results
        for r in with_faces:
            assert r["stream"] == "cam" and r["model"] == "face_detection@1" and r["age_ms"] >= 0
            x1, y1, x2, y2 = r["detections"][0]["box"]
            px, py, s = placements[r["frame"] % len(placements)]
            want = (px + face[0] * s, py + face[1] * s, px + face[2] * s, py + face[3] * s)
            center, want_center = ((x1 + x2) / 2, (y1 + y2) / 2), ((want[0] + want[2]) / 2, (want[1] + want[3]) / 2)
            assert abs(center[0] - want_center[0]) < 15 and abs(center[1] - want_center[1]) < 15, (r, want)
            assert r["detections"][0]["score"] > 0.5
        status = wait_for(lambda: (s := stream_status(daemon, "cam"))["inferred"] >= 10 and s, what="metrics")
        assert status["state"] == "running" and status["input_fps"] > 0 and status["age_ms_p50"] is not None
        snaps = list((tmp_path / "snaps").glob("cam-*.jpg"))
        assert snaps and sum(p.stat().st_size for p in snaps) <= 200000 + 60000
        # frames are decoded at half size for the 128x128 model, snapshots keep the captured 320x240 JPEG
        assert cv2.imread(str(snaps[-1])).shape == (240, 320, 3)
        assert daemon.client.infer("face_detection", {"input": np.zeros((1, 128, 128, 3), "float32")})
    finally:
        assert daemon.stop() == 0


def test_audio_stream_speech_events_over_mqtt(tmp_path, samples, broker):

    from tests.media import write_wav

    voice = load_voice(speech_wav(tmp_path / "speech.wav", "the quick brown fox jumps over the lazy dog"))
    pad = np.zeros(16000, np.float32)
    wav = write_wav(tmp_path / "padded.wav", np.concatenate([pad, voice, pad, pad]))
    events, status = vad_events_over_mqtt(tmp_path, samples, broker, wav, "mic-1",
                                          "{ type = \"vad\", threshold = 0.5, speech_pad_ms = 0 }")
    assert [e["event"] for e in events] == ["speech_start", "speech_end"], events
    end = events[1]
    loud = np.flatnonzero(np.abs(voice) > 0.02)  # where the voice really starts and ends
    true_start, true_end = 1.0 + loud[0] / 16000, 1.0 + loud[-1] / 16000
    assert abs(end["start"] - true_start) <= 0.1 and abs(end["end"] - true_end) <= 0.1, (end, true_start, true_end)
    assert all(isinstance(e["seq"], int) for e in events) and events[0]["model"] == "silero_vad@1"
    assert status["real_time_factor"] < 1.0, "faster than real time"


def test_bad_source_does_not_stop_other_streams_or_predicts(tmp_path, samples, face_video):
    # A misspelled source option no longer gets this far: the config is refused at load
    # (tests/test_config.py::test_stream_typos_are_refused_at_load_naming_the_key).
    video, _ = face_video
    install(tmp_path / "models", samples, "face_detection")
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[stream.good]
model = "face_detection"
source = {{ type = "video", path = "{video}", loop = true, realtime = true }}
pre = {FACE_PRE}
post = {FACE_POST}
[stream.missing]
model = "face_detection"
source = {{ type = "video", path = "{tmp_path / 'nope.avi'}" }}
pre = {FACE_PRE}
post = {FACE_POST}
[stream.wrong_pre]
model = "face_detection"
source = {{ type = "video", path = "{video}", loop = true }}
pre = {{ type = "image", size = [192, 192] }}
post = {FACE_POST}
""")
    daemon = start_daemon(tmp_path / "agent", "--config", str(config), "--models-dir", str(tmp_path / "models"))
    try:
        wait_for(lambda: stream_status(daemon, "good")["inferred"] >= 5, what="good stream runs")
        missing = wait_for(lambda: (s := stream_status(daemon, "missing"))["state"] == "reconnecting" and s,
                           what="missing source retried")
        assert "nope.avi" in missing["error"]
        wrong = wait_for(lambda: (s := stream_status(daemon, "wrong_pre"))["state"] == "failed" and s,
                         what="pre-processing mismatch")
        assert "192" in wrong["error"]
        assert daemon.client.infer("face_detection", {"input": np.zeros((1, 128, 128, 3), np.float32)})
        before = stream_status(daemon, "good")["inferred"]
        wait_for(lambda: stream_status(daemon, "good")["inferred"] > before, what="good stream keeps going")
        status, _, body = daemon.client.request("POST", "/v1/agent/streams/nope:start", b"")
        assert status == 400 and b"no stream 'nope'" in body
    finally:
        assert daemon.stop() == 0


def test_stop_start_and_model_switch_under_a_running_stream(tmp_path, samples, face_video):
    video, _ = face_video
    install(tmp_path / "models", samples, "face_detection")
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[stream.cam]
model = "face_detection"
source = {{ type = "video", path = "{video}", loop = true, realtime = true }}
pre = {FACE_PRE}
post = {FACE_POST}
""")
    daemon = start_daemon(tmp_path / "agent", "--config", str(config), "--models-dir", str(tmp_path / "models"))
    try:
        wait_for(lambda: stream_status(daemon, "cam")["inferred"] >= 3, what="running")
        status, _, body = daemon.client.request("POST", "/v1/agent/streams/cam:stop", b"")
        assert status == 200 and json.loads(body)["state"] == "stopped"
        status, _, body = daemon.client.request("POST", "/v1/agent/streams/cam:start", b"")
        assert status == 200
        status, _, body = daemon.client.request("POST", "/v1/agent/streams/cam:start", b"")
        assert status == 400 and b"already running" in body
        wait_for(lambda: stream_status(daemon, "cam")["state"] == "running", what="restarted")
        before = stream_status(daemon, "cam")["inferred"]
        # a new version appears and becomes the default while the stream runs (what a deployment's swap does)
        install(tmp_path / "models", samples, "face_detection", version=2)
        status, _, body = daemon.client.request("POST", "/v1/agent/models:reload", b"")
        assert status == 200 and json.loads(body)["added"] == ["face_detection@2"], body
        # The stream's thread switches at its next frame (a frame already in hand finishes on version 1):
        # from the switch on, every result is version 2's.
        wait_for(lambda: "stream.model_switched" in daemon.log_text(), 30, "the stream to switch models")
        results = sse(daemon.socket, "cam", 3)
        assert all(r["model"] == "face_detection@2" for r in results), results
        after = stream_status(daemon, "cam")
        assert after["state"] == "running" and after["inferred"] > before and after["model"] == "face_detection@2"
    finally:
        assert daemon.stop() == 0


def test_bundle_whose_processing_does_not_fit_the_model_is_refused_before_the_swap(tmp_path, samples):
    from tests.deploy_env import DeployEnv

    env = DeployEnv.create(tmp_path / "world", samples)
    try:
        env.publish_silero("vad", 1, manifest_extra={"preprocess": {"type": "audio", "sample_rate": 16000,
                                                                    "window": 512, "context": 64,
                                                                    "state": {"input": "state", "output": "stateN",
                                                                              "shape": [2, 1, 128]},
                                                                    "constants": {"sr": 16000}},
                                                     "postprocess": {"type": "vad"}})
        env.publish_silero("vad", 2, manifest_extra={"preprocess": {"type": "image", "size": [192, 192]}})
        config = env.agent_config(tmp_path / "agent.toml")
        daemon = start_daemon(tmp_path / "agent", "--config", str(config), "--models-dir", str(tmp_path / "models"))
        try:
            def deploy(version: int) -> dict:
                status, _, body = daemon.client.request("POST", "/v1/agent/models/vad:deploy",
                                                        json.dumps({"version": version}).encode())
                assert status == 202, body

                def final():
                    record = json.loads(daemon.client.request("GET", "/v1/agent/deployments/vad")[2])
                    return record if record["state"] in ("committed", "failed", "rolled_back") \
                        and not record["running"] else None

                return wait_for(final, 60, "deployment")

            assert deploy(1)["state"] == "committed"
            record = deploy(2)
            assert record["state"] == "failed" and record["error"]["code"] == "bad_pipeline", record
            assert "loaded" in [h[0] for h in record["history"]] and "swapped" not in [h[0] for h in record["history"]]
            models = {(m["name"], m["version"]) for m in daemon.client.status()["models"]}
            assert ("vad", 1) in models and ("vad", 2) not in models
        finally:
            assert daemon.stop() == 0
    finally:
        env.close()


def test_no_face_clip_yields_no_detections_and_fast_source_drops_frames(tmp_path, samples):
    frames = []
    for photo in ("coffee", "brick"):
        moved, _ = photo_frames(samples[photo], n=15, size=(320, 240))
        frames += moved
    video = make_video(tmp_path / "noface.avi", frames, fps=30)
    install(tmp_path / "models", samples, "face_detection")
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[stream.cam]
model = "face_detection"
source = {{ type = "video", path = "{video}", loop = true, realtime = true, fps = 3000 }}
pre = {FACE_PRE}
post = {FACE_POST}
[stream.file]
model = "face_detection"
source = {{ type = "video", path = "{video}", loop = false, realtime = false }}
pre = {FACE_PRE}
post = {FACE_POST}
""")
    daemon = start_daemon(tmp_path / "agent", "--config", str(config), "--models-dir", str(tmp_path / "models"))
    try:
        results = sse(daemon.socket, "cam", 40)
        assert len(results) == 40 and all(r["detections"] == [] for r in results), "no face, no detection"
        status = wait_for(lambda: (s := stream_status(daemon, "cam"))["dropped_frames"] > 0 and s,
                          what="a source paced faster than the model drops stale frames")
        assert status["captured"] > status["inferred"]  # stale frames are dropped, not queued (speed: bench/streams.py)
        done = wait_for(lambda: (s := stream_status(daemon, "file"))["state"] == "ended" and s, what="file done")
        assert done["inferred"] == len(frames) and done["dropped_frames"] == 0, "an unpaced file loses nothing"
    finally:
        assert daemon.stop() == 0


def test_speech_still_going_at_end_of_file_is_closed(tmp_path, samples, broker):

    from tests.media import write_wav

    voice = load_voice(speech_wav(tmp_path / "speech.wav", "one two three four five six seven"))
    loud = np.flatnonzero(np.abs(voice) > 0.02)
    cut = voice[: (loud[0] + loud[-1]) // 2]  # the file ends in the middle of the speech
    wav = write_wav(tmp_path / "cut.wav", np.concatenate([np.zeros(16000, np.float32), cut]))
    events, _ = vad_events_over_mqtt(tmp_path, samples, broker, wav, "mic-2", "{ type = \"vad\", threshold = 0.5 }")
    assert [e["event"] for e in events] == ["speech_start", "speech_end"], events
    assert events[-1].get("end_of_stream") is True
    assert abs(events[-1]["end"] - (1.0 + len(cut) / 16000)) < 0.1, "the segment ends with the audio"


def _open_fifo_writer(fifo: Path) -> int | None:
    """The FIFO's write end once the agent has its read end open (ENXIO until then)."""
    import os

    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None
    os.set_blocking(fd, True)
    return fd


def test_silent_fifo_is_reported_stalled_then_running_again(tmp_path, samples):
    """A FIFO whose writer stays connected but silent is not a healthy stream: after ``stall_after_s`` it is
    ``stalled``, with the time since its last item and an event; audio flowing again makes it ``running``."""
    import os

    fifo = tmp_path / "mic.fifo"
    os.mkfifo(fifo)
    install(tmp_path / "models", samples, "silero_vad")
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[stream.mic]
model = "silero_vad"
source = {{ type = "pcm", path = "{fifo}", sample_rate = 16000 }}
pre = {VAD_PRE}
post = {{ type = "vad", threshold = 0.5 }}
stall_after_s = 1.0
""")
    daemon = start_daemon(tmp_path / "agent", "--config", str(config), "--models-dir", str(tmp_path / "models"))
    half_second = np.zeros(8000, "<i2").tobytes()
    fd = wait_for(lambda: _open_fifo_writer(fifo), what="the agent's read end of the FIFO")
    try:
        os.write(fd, half_second)
        wait_for(lambda: (s := stream_status(daemon, "mic"))["captured"] > 0 and s["state"] == "running",
                 what="audio flowing")
        stalled = wait_for(lambda: (s := stream_status(daemon, "mic"))["state"] == "stalled" and s, timeout=15,
                           what="stalled while the writer is silent")
        assert stalled["since_last_item_s"] >= 1.0 and stalled["error"] is None
        wait_for(lambda: any('"stream.stalled"' in line for line in daemon.log_text().splitlines()),
                 what="the stalled log line (and event)")
        captured = stalled["captured"]
        os.write(fd, half_second)
        wait_for(lambda: (s := stream_status(daemon, "mic"))["state"] == "running" and s["captured"] > captured,
                 timeout=15, what="running again")
        wait_for(lambda: any('"stream.resumed"' in line for line in daemon.log_text().splitlines()),
                 what="the resumed log line")
    finally:
        os.close(fd)
        assert daemon.stop() == 0


def test_finished_stream_reports_current_rates_and_totals_apart(tmp_path, samples):
    """Rates are current (a sliding window), so a finished stream reports 0, not its average since start; the
    totals are reported apart."""
    wav = speech_wav(tmp_path / "speech.wav", "one two three")
    install(tmp_path / "models", samples, "silero_vad")
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[stream.mic]
model = "silero_vad"
source = {{ type = "wav", path = "{wav}", realtime = false }}
pre = {VAD_PRE}
post = {{ type = "vad", threshold = 0.5 }}
""")
    daemon = start_daemon(tmp_path / "agent", "--config", str(config), "--models-dir", str(tmp_path / "models"))
    try:
        # inferred > 0 first: until its first inference a stream's current inference rate is 0 too
        done = wait_for(lambda: (s := stream_status(daemon, "mic"))["state"] == "ended" and s["inferred"] > 0
                        and s["input_fps"] == 0 and s["inferred_per_s"] == 0 and s, timeout=30,
                        what="a finished stream at rate 0")
        assert done["captured"] >= done["inferred"] > 0, "the totals stay"
        assert done["rate_window_s"] > 0 and done["since_last_item_s"] is not None
    finally:
        assert daemon.stop() == 0
