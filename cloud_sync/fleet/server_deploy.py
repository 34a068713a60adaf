"""``edge-fleet deploy --via-server URL``: start a rollout on the fleet service and follow it.

The service owns the rollout (persisted waves, abort threshold, resume after a restart); this only
creates it over the REST API and prints its progress until it ends. Interrupting the command does
not stop the rollout. Standard library HTTP only: no fleet extra needed on the operator's machine.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from cloud_sync.fleet.console import FleetError

TOKEN_ENV = "EDGE_FLEET_TOKEN"  # noqa: S105 - the variable name, not a token


class ServerApi:
    """A minimal client of the fleet service's REST API."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0) -> None:
        self.base = base_url.rstrip("/")
        self.base = self.base[:-4] if self.base.endswith("/api") else self.base
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Raises FleetError with the service's error message (or the transport's)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.base}{path}", data=data, method=method,  # noqa: S310 - http(s) only
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        if not req.full_url.startswith(("http://", "https://")):
            raise FleetError(f"{self.base}: expected an http:// or https:// URL")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read())["error"]
                message = f"{error['code']}: {error['message']}"
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {exc.code}"
            raise FleetError(f"fleet service: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise FleetError(f"cannot reach the fleet service at {self.base}: {exc}") from None


def deploy(args: Any, model: str, version: int) -> int:
    """Create the deployment, print waves and device outcomes as they happen; 0 if it succeeded."""
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise FleetError(f"--via-server needs an operator token: --token or ${TOKEN_ENV}")
    api = ServerApi(args.via_server, token)
    body: dict[str, Any] = {"model": model, "version": version, "canary": str(args.canary),
                            "abort_threshold": str(args.abort_after), "wave_timeout_s": args.timeout}
    body.update({"devices": [args.to]} if args.to else {"group": args.group})
    if args.wave_size:
        body["wave_size"] = str(args.wave_size)
    dep = api.request("POST", "/api/deployments", body)
    print(f"deployment {dep['id']}: {model}@{version} to {len(dep['devices'])} devices in {dep['waves']} waves",
          flush=True)
    shown: dict[str, str] = {}
    wave = -1
    try:
        while True:
            if dep["current_wave"] != wave and dep["status"] == "running":
                wave = dep["current_wave"]
                members = [d["device_id"] for d in dep["devices"] if d["wave"] == wave]
                print(f"wave {wave + 1}/{dep['waves']}: {', '.join(members)}", flush=True)
            for d in dep["devices"]:
                if d["status"] in ("succeeded", "failed", "timeout") and shown.get(d["device_id"]) != d["status"]:
                    shown[d["device_id"]] = d["status"]
                    error = f" ({(d.get('error') or {}).get('message')})" if d["status"] != "succeeded" else ""
                    print(f"  {d['device_id']}: {d['status']}{error}", flush=True)
            if dep["status"] != "running":
                break
            time.sleep(1.0)
            dep = api.request("GET", f"/api/deployments/{dep['id']}")
    except KeyboardInterrupt:
        print(f"edge-fleet: stopped following; the rollout goes on (GET /api/deployments/{dep['id']})",
              file=sys.stderr)
        return 130
    counts = dep["counts"]
    print(f"{dep['status']}: succeeded {counts['succeeded']}, failed {counts['failed'] + counts['timeout']}, "
          f"skipped {counts['skipped']}" + (f" ({dep['reason']})" if dep.get("reason") else ""))
    return 0 if dep["status"] == "succeeded" else 1
