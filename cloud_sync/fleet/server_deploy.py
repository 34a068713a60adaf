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


def _api(url: str, token: str | None, flag: str) -> ServerApi:
    token = token or os.environ.get(TOKEN_ENV)
    if not token:
        raise FleetError(f"{flag} needs an operator token: --token or ${TOKEN_ENV}")
    return ServerApi(url, token)


def deploy(args: Any, model: str, version: int, shadow: dict[str, Any] | None = None) -> int:
    """Create the deployment (a shadow one when ``shadow`` is not None), print waves and device outcomes as
    they happen; 0 if it succeeded."""
    api = _api(args.via_server, args.token, "--via-server")
    body: dict[str, Any] = {"model": model, "version": version, "canary": str(args.canary),
                            "abort_threshold": str(args.abort_after), "wave_timeout_s": args.timeout}
    if shadow is not None:
        body.update({"mode": "shadow", "shadow": shadow})
    body.update({"devices": [args.to]} if args.to else {"group": args.group})
    if args.wave_size:
        body["wave_size"] = str(args.wave_size)
    dep = api.request("POST", "/api/deployments", body)
    mode = " as a shadow" if dep.get("mode") == "shadow" else ""
    print(f"deployment {dep['id']}: {model}@{version}{mode} to {len(dep['devices'])} devices in {dep['waves']} waves",
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
                    state = "shadowing" if d["status"] == "succeeded" and mode else d["status"]
                    print(f"  {d['device_id']}: {state}{error}", flush=True)
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
    if mode and counts["succeeded"]:
        print(f"then: edge-fleet rollout promote|discard {dep['id']} --server {api.base}")
    return 0 if dep["status"] == "succeeded" else 1


def act(args: Any) -> int:
    """``edge-fleet rollout promote|discard ID``: send the action, then print each device's answer as it comes
    (until ``--timeout``); 0 if every device it went to succeeded."""
    api = _api(args.server, args.token, "rollout")
    dep = api.request("POST", f"/api/deployments/{args.deployment}/{args.action}")
    sent = [d for d in dep["devices"] if d.get("action") == args.action]
    print(f"deployment {dep['id']}: {args.action} sent to {len(sent)} devices", flush=True)
    deadline = time.monotonic() + args.timeout
    shown: set[str] = set()
    while True:
        for d in sent:
            if d["action_status"] in ("succeeded", "failed") and d["device_id"] not in shown:
                shown.add(d["device_id"])
                error = d.get("action_error") or {}
                why = f" ({error.get('code')}: {error.get('message')})" if d["action_status"] == "failed" else ""
                print(f"  {d['device_id']}: {d['action_status']}{why}", flush=True)
        if len(shown) == len(sent) or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
        dep = api.request("GET", f"/api/deployments/{dep['id']}")
        sent = [d for d in dep["devices"] if d.get("action") == args.action]
    counts = dep["action_counts"] or {}
    print(f"{args.action}: succeeded {counts.get('succeeded', 0)}, failed {counts.get('failed', 0)}, "
          f"unanswered {counts.get('sent', 0) + counts.get('accepted', 0)}")
    return 0 if sent and counts.get("succeeded", 0) == len(sent) else 1
