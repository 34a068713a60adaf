"""A signed-update world for agent-level tests: a TUF repository with real keys, its HTTP
server on loopback (faults injectable per request), bundles of the real Silero model with
test vectors, and the agent config that trusts this repository."""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cloud_sync.bundles.build import build_bundle, generate_test_vectors
from cloud_sync.repo.repository import Repository, RoleKeys
from cloud_sync.repo.server import RepoHTTPServer, RepoRequestHandler, make_server


def silero_runner(model_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def silero_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": (0.1 * rng.standard_normal((1, 576))).astype(np.float32),
            "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}


class _Handler(RepoRequestHandler):
    """Serves the repository; ``server.hook(handler)`` may answer instead (fault injection)."""

    def do_GET(self) -> None:
        hook = getattr(self.server, "hook", None)
        if hook is not None and hook(self):
            return
        super().do_GET()


@dataclass
class DeployEnv:
    base: Path
    repo: Repository
    server: RepoHTTPServer
    samples: dict[str, Path]
    requests: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, base: Path, samples: dict[str, Path], *, timestamp_keys: RoleKeys | None = None) -> DeployEnv:
        roles = {"timestamp": timestamp_keys} if timestamp_keys else None
        repo = Repository.init(base / "repo", base / "keys", roles=roles)
        server = make_server(repo.dir, "127.0.0.1", 0, _Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return cls(base, repo, server, samples)

    @property
    def url(self) -> str:
        return str(self.server.url)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def set_hook(self, hook: Any) -> None:
        """``hook(handler) -> bool``: return True after answering to replace the normal reply."""
        self.server.hook = hook  # type: ignore[attr-defined]

    def build(self, name: str, version: int, *, model: Path | None = None, expected_scale: float = 1.0,
              manifest_extra: dict[str, Any] | None = None, files: tuple[Path, ...] = (),
              vectors: bool = True) -> Path:
        """A Silero bundle (or ``model``) with a generated test vector; ``expected_scale`` != 1 breaks it."""
        model = model or self.samples["silero_vad"]
        test_vectors = None
        if vectors:
            test_vectors = generate_test_vectors(self.samples["silero_vad"], silero_inputs(version),
                                                 silero_runner)
            if expected_scale != 1.0:
                for vector in test_vectors:
                    for value in vector["expected"].values():
                        value["data"] = [x * expected_scale for x in value["data"]]
        return build_bundle(model, self.base / "bundles", name=name, version=version, files=files,
                            manifest_extra=manifest_extra, test_vectors=test_vectors)

    def publish(self, bundle: Path) -> None:
        self.repo.publish(bundle)

    def publish_silero(self, name: str, version: int, **kw: Any) -> Path:
        bundle = self.build(name, version, **kw)
        self.publish(bundle)
        return bundle

    def agent_config(self, path: Path, *, health_window_s: float = 1.0, extra: str = "", **updates: Any) -> Path:
        """Agent TOML trusting this repository's root v1."""
        root = self.base / "root.json"
        root.write_bytes(self.repo.root_bytes(1))
        lines = ["[updates]", f'repo_url = "{self.url}"', f'trusted_root = "{root}"',
                 f"health_window_s = {health_window_s}"]
        lines += [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {str(v).lower() if isinstance(v, bool) else v!r}"
                  for k, v in updates.items()]
        path.write_text("\n".join(lines) + "\n" + extra)
        return path

    def copy_model(self, name: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.samples[name], dest)
        return dest
