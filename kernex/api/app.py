"""The FastAPI application factory and the lifespan that owns its resources."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import kernex
from kernex.api.admission import routes as admission
from kernex.api.apitokens import routes as apitokens
from kernex.api.audit import routes as audit
from kernex.api.auth import routes as auth
from kernex.api.broker_link import BrokerLink
from kernex.api.bundles import routes as bundles
from kernex.api.commands import routes as commands
from kernex.api.configs import routes as configs
from kernex.api.dashboard.routes import install_dashboard
from kernex.api.deployments import routes as deployments
from kernex.api.devices import routes as devices
from kernex.api.docs.routes import install_docs
from kernex.api.errors import ERROR_RESPONSES, install_error_handlers
from kernex.api.fallback import routes as fallback
from kernex.api.fleet_metrics import FleetGauges
from kernex.api.groups import routes as groups
from kernex.api.health import routes as health
from kernex.api.integrations import routes as integrations
from kernex.api.middleware import install_middleware
from kernex.api.ratelimit import RateLimits
from kernex.api.rollouts import routes as rollouts
from kernex.api.settings import ApiSettings
from kernex.api.state import AppState
from kernex.api.users import routes as users
from kernex.api.webhooks import routes as webhooks
from kernex.broker.exceptions import PKIError
from kernex.broker.pki import API_IDENTITY, FleetPKI
from kernex.kit.logs import get_logger
from kernex.storage.database import create_engine, session_factory

log = get_logger(__name__)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    """Build the API. Resources are created in the lifespan, not at import or build time."""
    settings = settings or ApiSettings()
    registry = CollectorRegistry()
    gauges = FleetGauges(registry)
    limits = RateLimits(
        per_minute=settings.rate_limit_per_minute,
        login_per_minute=settings.login_rate_limit_per_minute,
        device_address_per_minute=settings.device_rate_limit_per_address_per_minute,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pki = FleetPKI.from_settings(settings)
        if not pki.is_initialized:
            raise PKIError(f"no fleet PKI in {settings.pki_dir}: run `kernex pki init` first")
        engine = create_engine(settings.resolved_database_url)
        broker = BrokerLink(
            host=settings.mqtt_host,
            port=settings.mqtt_port,
            ca_cert=pki.ca_cert_path,
            cert=pki.service_cert_path(API_IDENTITY),
            key=pki.service_key_path(API_IDENTITY),
        )
        app.state.kernex = AppState(
            settings=settings,
            engine=engine,
            sessions=session_factory(engine),
            pki=pki,
            broker=broker,
            registry=registry,
            jwt_secret=settings.resolved_jwt_secret(),
            limits=limits,
        )
        broker_task = asyncio.create_task(broker.run(), name="broker-link")
        gauges_task = asyncio.create_task(gauges.run(engine), name="fleet-metrics")
        log.info("api started", database=engine.url.render_as_string(hide_password=True))
        try:
            yield
        finally:
            for task in (broker_task, gauges_task):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await engine.dispose()
            log.info("api stopped")

    app = FastAPI(
        title="Kernex API",
        version=kernex.__version__,
        description="Fleet management and over-the-air updates for Linux edge devices.",
        lifespan=lifespan,
        # FastAPI's own pages load Swagger UI and ReDoc from a CDN; Kernex runs offline (install_docs).
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    install_middleware(app, registry, settings, limits)
    install_docs(app)
    app.include_router(health.router)
    for router in (
        auth.router,
        users.router,
        apitokens.router,
        audit.router,
        devices.device_router,
        devices.router,
        admission.tokens_router,
        admission.preauth_router,
        bundles.router,
        # Carries the commands lifespan (signing key, republisher, sweeper): after bundles, whose
        # store deployments check.
        deployments.router,
        # Carries the rollout engine's lifespan, which needs the commands runtime: after deployments.
        rollouts.router,
        groups.router,
        groups.device_router,
        commands.router,
        deployments.device_router,
        configs.device_router,
        configs.router,
        fallback.router,
        webhooks.router,
        integrations.router,
    ):
        # Every API route documents the error shape of each status it may answer with.
        app.include_router(router, responses=ERROR_RESPONSES)
    # The web dashboard at /ui and its live events stream (after the routers whose lifespans it needs).
    install_dashboard(app)
    return app
