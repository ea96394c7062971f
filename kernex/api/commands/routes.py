"""`/api/v1/command-keys`: the control-plane keys that sign commands, rotated and retired (admins)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Request

from kernex.api.audit import service as audit
from kernex.api.auth.deps import AdminDep, ViewerDep
from kernex.api.commands.runtime import CommandsDep
from kernex.api.commands.schemas import CommandKeyRingOut, CommandKeyRotate, CommandKeyRotated
from kernex.api.deps import SessionDep, SettingsDep

router = APIRouter(prefix="/api/v1/command-keys", tags=["command keys"])


@router.get("", response_model=CommandKeyRingOut, operation_id="listCommandKeys")
async def list_command_keys(_: ViewerDep, runtime: CommandsDep) -> CommandKeyRingOut:
    """The key set devices pin, and which key signs now."""
    return CommandKeyRingOut.of(runtime.keys.ring, datetime.now(UTC))


@router.post("/rotate", response_model=CommandKeyRotated, operation_id="rotateCommandKey")
async def rotate_command_key(
    body: CommandKeyRotate,
    admin: AdminDep,
    runtime: CommandsDep,
    settings: SettingsDep,
    request: Request,
    session: SessionDep,
) -> CommandKeyRotated:
    """Add a key: the new key set (signed by the current key) goes to the fleet now, and the
    new key signs commands once the transition is over."""
    transition_s = body.transition_s if body.transition_s is not None else settings.command_key_transition_s
    async with audit.audited(session, actor=admin, action="command_key.rotate", target=None, request=request):
        added = await runtime.keys.rotate(timedelta(seconds=transition_s))
    ring = runtime.keys.ring
    await audit.record(
        session,
        actor=admin,
        action="command_key.rotate",
        target=f"command_key:{added.kid}",
        outcome="success",
        request=request,
        details={"version": ring.version, "signs_from": added.signs_from.isoformat()},
    )
    return CommandKeyRotated(**CommandKeyRingOut.of(ring, datetime.now(UTC)).model_dump(), added=added.kid)


@router.delete("/{kid}", response_model=CommandKeyRingOut, operation_id="retireCommandKey")
async def retire_command_key(
    kid: str, admin: AdminDep, runtime: CommandsDep, request: Request, session: SessionDep
) -> CommandKeyRingOut:
    """Retire a key a newer one replaced: devices stop trusting it with the next key set."""
    target = f"command_key:{kid}"
    async with audit.recorded(
        session, actor=admin, action="command_key.retire", target=target, request=request
    ) as details:
        ring = await runtime.keys.retire(kid)
        details.update({"version": ring.version})
    return CommandKeyRingOut.of(ring, datetime.now(UTC))
