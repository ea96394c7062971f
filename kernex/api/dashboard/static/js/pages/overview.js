// Fleet overview: counts, versions in the field, active deployments and recent failures.

import { api } from "../api.js";
import { add, ago, badge, clear, empty, errorState, formatNumber, h, progress, throttle } from "../dom.js";

const FAILED = new Set(["failed", "partially_failed"]);
const ACTIVE = new Set(["pending", "in_progress"]);
const REFETCH_MS = 3000;

export async function render(ctx) {
  const { main } = ctx;
  const cards = h("div", { class: "cards" });
  const versions = h("section", { class: "card", "aria-labelledby": "versions-h" });
  const active = h("section", { class: "card", "aria-labelledby": "active-h" });
  const failures = h("section", { class: "card", "aria-labelledby": "failures-h" });
  add(main, h("h1", {}, "Fleet overview"), cards, h("div", { class: "grid-2" }, versions, active), failures);

  const numbers = {};
  function card(key, label, href, tone) {
    numbers[key] = h("span", { class: "card-number", dataset: { count: key } }, "…");
    return h("a", { class: `card stat tone-${tone}`, href }, numbers[key], h("span", { class: "card-label" }, label));
  }
  add(
    cards,
    card("total", "Devices", "#/devices", "muted"),
    card("online", "Online", "#/devices?status=online", "good"),
    card("offline", "Offline", "#/devices?status=offline", "bad"),
    card("unknown", "Never connected", "#/devices?status=unknown", "muted"),
    card("active_deployments", "Active deployments", "#/deployments?status=in_progress", "info"),
  );

  function showStats(stats) {
    for (const [key, el] of Object.entries(numbers)) el.textContent = formatNumber(stats[key] ?? 0);
  }

  function showVersions(byVersion, total) {
    const rows = Object.entries(byVersion).sort((a, b) => b[1] - a[1]);
    clear(versions, h("h2", { id: "versions-h" }, "Versions in the field"));
    if (!rows.length) {
      add(
        versions,
        empty(
          "No devices yet.",
          "Start an agent (`kernex agent run --api <this server>`) or `kernex up --devices 3` to see versions here.",
        ),
      );
      return;
    }
    add(
      versions,
      h(
        "ul",
        { class: "versions" },
        rows.map(([version, count]) => {
          const bar = h("span", { class: "version-bar" });
          bar.style.width = `${total ? (100 * count) / total : 0}%`;
          return h(
            "li",
            {},
            h("span", { class: "version-name" }, version === "none" ? "no bundle" : version),
            h("span", { class: "version-track" }, bar),
            h("span", { class: "version-count" }, formatNumber(count)),
          );
        }),
      ),
    );
  }

  function deploymentRow(d) {
    return h(
      "li",
      { class: "deployment-row" },
      h(
        "a",
        { href: `#/deployments/${d.id}` },
        `${d.bundle_name} ${d.bundle_version}`,
        d.rollback ? " (rollback)" : "",
      ),
      badge(d.status),
      progress(d.counts, d.total),
      h("span", { class: "muted" }, "started ", ago(d.created_at)),
    );
  }

  function showDeployments(items) {
    const running = items.filter((d) => ACTIVE.has(d.status));
    clear(active, h("h2", { id: "active-h" }, "Active deployments"));
    add(
      active,
      running.length
        ? h("ul", { class: "plain" }, running.map(deploymentRow))
        : empty(
            "Nothing is being deployed.",
            "Upload a bundle, then create a deployment to roll it out.",
            h("a", { href: "#/deployments/new", class: "button" }, "New deployment"),
          ),
    );
    const failed = items
      .filter((d) => FAILED.has(d.status) || (d.counts && (d.counts.failed || d.counts.rolled_back)))
      .slice(0, 8);
    clear(failures, h("h2", { id: "failures-h" }, "Recent failures"));
    add(
      failures,
      failed.length
        ? h("ul", { class: "plain" }, failed.map(deploymentRow))
        : empty(
            "No failed deployments recently.",
            "Failures of the latest 50 deployments show here with links to each device's error.",
          ),
    );
  }

  let deployments = [];
  async function load() {
    try {
      const [stats, page] = await Promise.all([
        api("GET", "/api/v1/devices/stats"),
        api("GET", "/api/v1/deployments", { params: { limit: 50 } }),
      ]);
      if (ctx.stale()) return;
      deployments = page.items;
      showStats(stats);
      showVersions(stats.by_bundle_version, stats.total);
      showDeployments(deployments);
    } catch (error) {
      if (!ctx.stale()) clear(versions, errorState(error, load));
    }
  }
  const reload = throttle(load, REFETCH_MS);

  ctx.on("refresh", reload);
  ctx.on("stats", showStats);
  // Versions move when devices report a new bundle; counts move with targets: re-read, throttled.
  // Each device's version as events report it: only a change (not a heartbeat) re-reads.
  const seen = new Map();
  ctx.on("devices", (data) => {
    let moved = false;
    for (const d of data.items) {
      if (d.removed || (seen.has(d.id) && seen.get(d.id) !== d.bundle_version)) moved = true;
      seen.set(d.id, d.bundle_version);
    }
    if (moved) reload();
  });
  ctx.on("deployments", (data) => {
    let unknown = false;
    for (const change of data.items) {
      const known = deployments.find((d) => d.id === change.id);
      if (known) Object.assign(known, change);
      else unknown = true;
    }
    if (unknown) reload();
    else showDeployments(deployments);
  });
  await load();
}
