"""The MQTT commands the agent answers: argument models and handlers, each one call into the
operations facade (the same call the HTTP route makes). The dispatcher validates the arguments
once and maps any error to the response's ``code`` once; handlers only translate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cloud_sync.mqtt.commands import Command, Spec
from cloud_sync.mqtt.contract import LogsArgs, ModelArgs, RollbackArgs, SetConfigArgs, ShadowActionArgs, StreamArgs

if TYPE_CHECKING:
    from agent.operations import Operations


def command_specs(ops: Operations) -> dict[str, Spec]:
    """Every command by name."""

    async def ping(_c: Command, _a: None) -> dict[str, Any]:
        return ops.ping()

    async def status(_c: Command, _a: None) -> dict[str, Any]:
        return await ops.status()

    async def reload(_c: Command, _a: None) -> dict[str, Any]:
        return await ops.reload()

    async def deploy(_c: Command, a: ModelArgs) -> dict[str, Any]:
        shadow = a.shadow.model_dump() if a.shadow is not None else None
        return (await ops.deploy_and_wait(a.model, a.version, a.mode, shadow)).to_dict()

    async def promote(_c: Command, a: ShadowActionArgs) -> dict[str, Any]:
        return (await ops.promote_and_wait(a.model, a.version)).to_dict()

    async def discard(_c: Command, a: ShadowActionArgs) -> dict[str, Any]:
        return await ops.discard(a.model, a.version)

    async def shadows(_c: Command, _a: None) -> dict[str, Any]:
        return {"shadows": ops.shadows()}

    async def rollback(_c: Command, a: RollbackArgs) -> dict[str, Any]:
        return await ops.rollback(a.model)

    async def stream(c: Command, a: StreamArgs) -> dict[str, Any]:
        return ops.stream_start(a.stream) if c.name == "stream-start" else await ops.stream_stop(a.stream)

    async def logs(_c: Command, a: LogsArgs) -> dict[str, Any]:
        return {"lines": ops.logs(a.lines)}

    async def set_config(_c: Command, a: SetConfigArgs) -> dict[str, Any]:
        return await ops.set_config(a.values)

    return {
        "ping": Spec(ping),
        "status": Spec(status),
        "reload": Spec(reload, long_running=True),
        "deploy": Spec(deploy, ModelArgs, long_running=True),
        "rollback": Spec(rollback, RollbackArgs, long_running=True),
        "promote": Spec(promote, ShadowActionArgs, long_running=True),
        "discard": Spec(discard, ShadowActionArgs),
        "shadows": Spec(shadows),
        "set-config": Spec(set_config, SetConfigArgs),
        "stream-start": Spec(stream, StreamArgs),
        "stream-stop": Spec(stream, StreamArgs),
        "logs": Spec(logs, LogsArgs),
    }
