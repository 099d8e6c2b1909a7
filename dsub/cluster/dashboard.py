"""A local cluster's Dask dashboard, loaded when it is first opened.

A Dask scheduler loads its dashboard as it starts (``Scheduler.__init__``
imports ``distributed.dashboard.scheduler``: bokeh's models and distributed's
panels, and asks NVML for the GPUs). A local cluster's scheduler runs in the
coordinator's own event-loop thread, and dsub starts it beside the input
checks (``early``): that import, 1.5-2.4 s of interpreter time on a 2-core VM
and 2.5-3 times that on the GPU hosts, was taken from the checks' thread
(BENCHMARKS.md, "The command's fixed part"). So the local scheduler starts
with ``dashboard=False``: its HTTP server listens at ``--dashboard-address`` as
before (a port in use or an address not of this machine fails the start as
before, and the printed link names it) and serves Dask's plain routes
(``/health``, ``/info``, ``/metrics``); any other page first attaches the
dashboard, as the scheduler would have (``distributed.dashboard.scheduler.connect``),
then redirects to itself. Runs that nobody watches never load it; the first
page opened waits for the import, which runs in a thread while the scheduler's
loop goes on scheduling.
"""

from __future__ import annotations

import asyncio
import importlib

from tornado import web

#: The module a Dask scheduler loads for its dashboard (``distributed.scheduler.Scheduler.__init__``).
DASHBOARD_MODULE = "distributed.dashboard.scheduler"

#: Where the dashboard's pages start: a local cluster's scheduler is given no other ``http_prefix``.
DASHBOARD_PREFIX = "/"


class _AttachOnRequest(web.RequestHandler):
    """Any page the scheduler's own routes do not serve: attach the dashboard, then ask for the page again."""

    def initialize(self, dashboard: "DashboardOnRequest") -> None:
        self.dashboard = dashboard

    async def get(self, *args) -> None:
        try:
            await self.dashboard.attach()
        except Exception as exc:  # noqa: BLE001 -- said to the browser; the run goes on without a dashboard
            self.set_status(503)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(f"The Dask dashboard could not be loaded: {type(exc).__name__}: {exc}\n")
            return
        self.redirect(self.request.uri)


class DashboardOnRequest:
    """The dashboard of ``scheduler`` (a ``distributed.Scheduler`` started with ``dashboard=False``), attached when
    a page of it is first asked for.

    ``install()`` runs on the scheduler's event loop; ``attached`` says whether
    the dashboard has been attached. A failed attachment (bokeh missing or
    broken) answers 503 with Dask's reason and is tried again on the next request.
    """

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.attached = False
        self._attaching: asyncio.Future | None = None
        self._placeholder = web.Application([(r".*", _AttachOnRequest, {"dashboard": self})])

    def install(self) -> None:
        """Serve the dashboard's pages through ``_AttachOnRequest`` until it is attached."""
        self.scheduler.http_application.add_application(self._placeholder)

    async def attach(self) -> None:
        """Import the dashboard in a thread, then connect it to the scheduler's HTTP server (once)."""
        if self._attaching is None:
            self._attaching = asyncio.ensure_future(self._attach())
        attaching = self._attaching
        try:
            await asyncio.shield(attaching)
        except Exception:
            if self._attaching is attaching:
                self._attaching = None  # the next request tries again
            raise

    async def _attach(self) -> None:
        module = await asyncio.get_running_loop().run_in_executor(None, importlib.import_module, DASHBOARD_MODULE)
        if self.attached:
            return
        application = self.scheduler.http_application
        # The placeholder goes first: distributed's RoutingApplication asks its applications in order.
        application.applications.remove(self._placeholder)
        module.connect(application, self.scheduler.http_server, self.scheduler, prefix=DASHBOARD_PREFIX)
        self.attached = True


def dashboard_on_request(cluster) -> DashboardOnRequest | None:
    """Put a ``DashboardOnRequest`` on ``cluster``'s scheduler (in this process, started with ``dashboard=False``);
    None where it serves no HTTP."""
    scheduler = cluster.scheduler
    if getattr(scheduler, "http_application", None) is None or "dashboard" not in scheduler.services:
        return None
    dashboard = DashboardOnRequest(scheduler)

    async def install() -> None:
        dashboard.install()

    cluster.sync(install)
    return dashboard
