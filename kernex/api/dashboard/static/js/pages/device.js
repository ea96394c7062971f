// Device detail: live state, metrics charts over a chosen window, bundle history, the config
// editor (desired vs reported) and rollback.
//
// Operators also accept, reject and revoke devices here.

import { ApiError, api } from "../api.js";
import { lineChart } from "../chart.js";
import {
  add,
  ago,
  badge,
  clear,
  confirmDialog,
  empty,
  errorState,
  field,
  formatNumber,
  h,
  notify,
  readSequence,
  throttle,
  when,
} from "../dom.js";

const WINDOWS = [
  [15, "Last 15 minutes"],
  [60, "Last hour"],
  [360, "Last 6 hours"],
  [1440, "Last 24 hours"],
];
const HEARTBEAT_LIMIT = 500; // the API's page maximum
const METRICS = [
  ["cpu_percent", "CPU", "%"],
  ["memory_mb", "Memory", "MB"],
  ["disk_free_mb", "Free disk", "MB"],
];
const SETTINGS = [
  ["heartbeat_interval_s", "Heartbeat interval (s)"],
  ["download_timeout_s", "Download timeout (s)"],
  ["install_timeout_s", "Install timeout (s)"],
  ["api_timeout_s", "API timeout (s)"],
];

export async function render(ctx) {
  const { main } = ctx;
  const id = ctx.args[0];
  const path = `/api/v1/devices/${encodeURIComponent(id)}`;
  const heading = h("h1", {}, id);
  const facts = h("section", { class: "card", "aria-label": "Device state" });
  const actions = h("div", { class: "actions" });
  const charts = h("div", { class: "charts" });
  const windowSelect = h(
    "select",
    { name: "window" },
    WINDOWS.map(([minutes, label]) => h("option", { value: minutes, selected: minutes === 15 }, label)),
  );
  const metricsNote = h("p", { class: "muted small" });
  const history = h("section", { class: "card", "aria-labelledby": "history-h" });
  const config = h("section", { class: "card", "aria-labelledby": "config-h" });
  add(
    main,
    h("p", { class: "crumbs" }, h("a", { href: "#/devices" }, "Devices"), " / "),
    heading,
    actions,
    facts,
    h(
      "section",
      { class: "card", "aria-labelledby": "metrics-h" },
      h("div", { class: "section-head" }, h("h2", { id: "metrics-h" }, "Metrics"), field("Window", windowSelect)),
      charts,
      metricsNote,
    ),
    history,
    config,
  );

  let device = null;
  let appliedSeen = null; // the device's configuration state as the last event reported it

  function showDevice(d) {
    device = d;
    heading.textContent = d.name || d.id;
    document.title = `${d.name || d.id} · Kernex`;
    const m = d.metrics || {};
    clear(
      facts,
      h(
        "dl",
        { class: "facts" },
        fact("Status", h("span", {}, badge(d.status), " since ", ago(d.status_changed_at))),
        fact("Last seen", ago(d.last_seen_at)),
        fact("Admission", badge(d.state)),
        fact("Health", d.health ? badge(d.health) : "—"),
        fact("Bundle", d.bundle?.version ? `${d.bundle.version}` : "none installed"),
        fact("Config version", d.config_version ?? "—"),
        fact("Agent", d.agent_version || "—"),
        fact("CPU / memory", `${formatNumber(m.cpu_percent, "%")} / ${formatNumber(m.memory_mb, "MB")}`),
        fact("Tags", d.tags.length ? d.tags.join(", ") : "—"),
        fact("Registered", when(d.registered_at)),
        fact("Certificate until", when(d.cert_not_after)),
        fact("Key", `${d.key_type} · ${d.key_fingerprint}`),
        fact("Device id", h("span", { class: "mono" }, d.id)),
      ),
    );
    // Rebuilt only when it changes, so a focused button is not pulled away by a heartbeat.
    const key = `${d.state} ${d.bundle?.version || ""}`;
    if (actions.dataset.key === key) return;
    actions.dataset.key = key;
    if (!ctx.can("operator")) return clear(actions);
    clear(
      actions,
      d.state === "active" && d.bundle?.version
        ? h("button", { type: "button", class: "danger", onclick: rollback }, "Roll back to the previous bundle")
        : null,
      d.state === "pending" || d.state === "rejected" ? admission("accept", "Accept", "secondary") : null,
      d.state === "pending" ? admission("reject", "Reject", "danger") : null,
      d.state === "active" ? admission("revoke", "Revoke", "danger") : null,
    );
  }

  // Admission: accept or reject a pending device, revoke (decommission) an active one.
  const ADMISSION = {
    accept: ["Accept this device?", "It gets its certificate at its next poll and joins the fleet."],
    reject: ["Reject this device?", "It never gets a certificate, and its agent stops."],
    revoke: [
      "Revoke this device?",
      "Its certificate is revoked and its connection cut; it can no longer report or download. This cannot be undone.",
    ],
  };

  function admission(verb, label, tone) {
    const run = async () => {
      const [title, text] = ADMISSION[verb];
      if (!(await confirmDialog(title, text, label))) return;
      try {
        await api("POST", `${path}/${verb}`);
        notify(`${device.name || device.id}: ${verb === "accept" ? "accepted" : `${verb}ed`}.`);
        await loadDevice();
      } catch (error) {
        notify(error.message, "bad");
      }
    };
    return h("button", { type: "button", class: tone, onclick: run }, label);
  }

  async function rollback() {
    const ok = await confirmDialog(
      "Roll back this device?",
      `${device.name || device.id} will be sent its previous successful bundle, as a rollback deployment you can follow.`,
      "Roll back",
    );
    if (!ok) return;
    try {
      const deployment = await api("POST", `${path}/rollback`, { body: {} });
      notify(`Rollback to ${deployment.bundle_version} started.`);
      location.hash = `#/deployments/${deployment.id}`;
    } catch (error) {
      notify(
        error.status === 409 || error.status === 404 ? `Cannot roll back: ${error.message}` : error.message,
        "bad",
      );
    }
  }

  // Heartbeats newest first from the API; charted oldest first.
  let beats = [];
  const metricsReads = readSequence(); // the window can change while a read is on its way
  async function loadMetrics() {
    const latest = metricsReads.start();
    const minutes = Number(windowSelect.value);
    const since = new Date(Date.now() - minutes * 60000).toISOString();
    try {
      const page = await api("GET", `${path}/heartbeats`, { params: { since, limit: HEARTBEAT_LIMIT } });
      if (ctx.stale() || !latest()) return;
      beats = page.items.slice().reverse();
      drawCharts();
      const newest = beats[beats.length - 1];
      if (newest && device) {
        device.metrics = {
          cpu_percent: newest.cpu_percent,
          memory_mb: newest.memory_mb,
          disk_free_mb: newest.disk_free_mb,
          uptime_s: newest.uptime_s,
        };
        showDevice(device);
      }
    } catch (error) {
      if (!ctx.stale() && latest()) clear(charts, errorState(error, loadMetrics));
    }
  }

  function drawCharts() {
    const minutes = Number(windowSelect.value);
    const to = Date.now();
    const from = to - minutes * 60000;
    const inWindow = beats.filter((b) => Date.parse(b.ts) >= from);
    clear(
      charts,
      METRICS.map(([key, title, unit]) =>
        lineChart({
          title,
          unit,
          from,
          to,
          points: inWindow.map((b) => ({ t: Date.parse(b.ts), v: b[key] })).filter((p) => p.v !== null),
        }),
      ),
    );
    metricsNote.textContent =
      inWindow.length >= HEARTBEAT_LIMIT
        ? `Showing the newest ${HEARTBEAT_LIMIT} heartbeats, from ${new Date(Date.parse(inWindow[0].ts)).toLocaleString()}: choose a shorter window for the full detail.`
        : `${inWindow.length} heartbeats in this window.`;
  }

  async function loadHistory() {
    clear(history, h("h2", { id: "history-h" }, "Bundle history"));
    try {
      const page = await api("GET", `${path}/bundle-history`, { params: { limit: 20 } });
      if (ctx.stale()) return;
      add(
        history,
        page.items.length
          ? h(
              "div",
              { class: "table-wrap" },
              h(
                "table",
                { class: "table stack" },
                h(
                  "thead",
                  {},
                  h(
                    "tr",
                    {},
                    ["Bundle", "Result", "Deployment", "Started", "Finished"].map((c) => h("th", { scope: "col" }, c)),
                  ),
                ),
                h(
                  "tbody",
                  {},
                  page.items.map((e) =>
                    h(
                      "tr",
                      {},
                      h(
                        "td",
                        { "data-label": "Bundle" },
                        h("a", { href: `#/bundles/${e.bundle_id}` }, `${e.bundle_name || "bundle"} ${e.version}`),
                        e.rollback ? " (rollback)" : "",
                      ),
                      h("td", { "data-label": "Result" }, badge(e.result)),
                      h(
                        "td",
                        { "data-label": "Deployment" },
                        e.deployment_id ? h("a", { href: `#/deployments/${e.deployment_id}` }, "view") : "—",
                      ),
                      h("td", { "data-label": "Started" }, when(e.started_at)),
                      h("td", { "data-label": "Finished" }, when(e.finished_at)),
                    ),
                  ),
                ),
              ),
            )
          : empty(
              "No bundle has been deployed to this device yet.",
              "Create a deployment that targets it from the Deployments page.",
            ),
      );
    } catch (error) {
      if (!ctx.stale()) add(history, errorState(error, loadHistory));
    }
  }

  let editing = false;
  // A save supersedes the reads on their way, so one sent before it cannot bring the old
  // configuration back on screen after it.
  const configReads = readSequence();
  async function loadConfig() {
    if (editing) return; // never pull the form from under someone typing
    const latest = configReads.start();
    // Checked again on the answer: the operator may have started editing while it was on its way.
    const current = () => !ctx.stale() && !editing && latest();
    try {
      const view = await api("GET", `${path}/config`);
      if (current()) showConfig(view);
    } catch (error) {
      if (current()) clear(config, h("h2", { id: "config-h" }, "Configuration"), errorState(error, loadConfig));
    }
  }

  function showConfig(view) {
    const desired = view.desired;
    const values = desired ? desired.values : null;
    const overrides = desired ? desired.overrides : {};
    const rows = [...SETTINGS, ["log_level", "Log level"]].map(([key, label]) =>
      h(
        "tr",
        {},
        h("th", { scope: "row" }, label),
        h("td", { "data-label": "Desired" }, values ? String(values[key]) : "defaults"),
        h("td", { "data-label": "Override" }, overrides[key] ?? "—"),
      ),
    );
    const sync = view.in_sync
      ? h(
          "p",
          { class: "sync tone-good", role: "status" },
          "In sync: the device reported applying the desired version.",
        )
      : h(
          "p",
          { class: "sync tone-warn", role: "status" },
          `Waiting for the device: desired version ${desired ? desired.version : "—"}, reported ${view.reported.version ?? "none"}.`,
        );
    clear(
      config,
      h("h2", { id: "config-h" }, "Configuration"),
      sync,
      view.reported.error
        ? h("p", { class: "form-error", role: "alert" }, `The device could not apply it: ${view.reported.error}`)
        : null,
      h(
        "dl",
        { class: "facts" },
        fact(
          "Desired version",
          desired
            ? h("span", {}, String(desired.version), " · ", desired.command_state ? badge(desired.command_state) : "")
            : "none set (fleet defaults)",
        ),
        fact("Reported version", view.reported.version ?? "none reported"),
        fact("Applied", when(view.reported.applied_at)),
        fact("Set by", desired ? `${desired.created_by || "—"}, ` : "—", desired ? when(desired.created_at) : null),
      ),
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "table" },
          h("caption", {}, "Desired settings (fleet defaults merged with this device's overrides)"),
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              h("th", { scope: "col" }, "Setting"),
              h("th", { scope: "col" }, "Desired"),
              h("th", { scope: "col" }, "Override"),
            ),
          ),
          h("tbody", {}, rows),
        ),
      ),
      values && Object.keys(values.extra || {}).length
        ? h("pre", { class: "code" }, JSON.stringify(values.extra, null, 2))
        : null,
      ctx.can("operator") ? editor(overrides) : null,
    );
  }

  function editor(overrides) {
    const inputs = {};
    for (const [key] of SETTINGS) {
      inputs[key] = h("input", {
        type: "number",
        min: 1,
        max: 86400,
        name: key,
        value: overrides[key] ?? "",
        placeholder: "fleet default",
        inputmode: "numeric",
      });
    }
    inputs.log_level = h(
      "select",
      { name: "log_level" },
      ["", "DEBUG", "INFO", "WARNING", "ERROR"].map((v) =>
        h("option", { value: v, selected: (overrides.log_level || "") === v }, v || "fleet default"),
      ),
    );
    const extra = h(
      "textarea",
      { name: "extra", rows: 4, spellcheck: "false" },
      overrides.extra && Object.keys(overrides.extra).length ? JSON.stringify(overrides.extra, null, 2) : "",
    );
    const error = h("p", { class: "form-error", role: "alert" });
    const save = h("button", { type: "submit" }, "Save and send to the device");
    const form = h(
      "form",
      {
        class: "config-form",
        onsubmit: async (event) => {
          event.preventDefault();
          error.textContent = "";
          const body = {};
          for (const [key] of SETTINGS) if (inputs[key].value !== "") body[key] = Number(inputs[key].value);
          if (inputs.log_level.value) body.log_level = inputs.log_level.value;
          if (extra.value.trim()) {
            try {
              body.extra = JSON.parse(extra.value);
            } catch {
              error.textContent = 'Extra settings must be a JSON object, e.g. {"site": "berlin"}.';
              extra.focus();
              return;
            }
          }
          save.disabled = true;
          configReads.supersede();
          try {
            const view = await api("PUT", `${path}/config`, { body });
            editing = false;
            notify(`Configuration version ${view.desired ? view.desired.version : ""} sent.`);
            showConfig(view);
          } catch (failure) {
            error.textContent = failure instanceof ApiError ? failure.message : String(failure);
            save.disabled = false;
          }
        },
        oninput: () => {
          editing = true;
        },
      },
      h("h3", {}, "Edit this device's overrides"),
      h(
        "p",
        { class: "hint" },
        "Leave a field empty to use the fleet default. Saving sends a new signed configuration version to the device.",
      ),
      h(
        "div",
        { class: "form-grid" },
        SETTINGS.map(([key, label]) => field(label, inputs[key])),
        field("Log level", inputs.log_level),
      ),
      field("Extra settings (JSON object)", extra, "Free-form scalar values, up to 64 keys."),
      error,
      h(
        "div",
        { class: "actions" },
        save,
        h(
          "button",
          {
            type: "button",
            class: "secondary",
            onclick: () => {
              editing = false;
              loadConfig();
            },
          },
          "Discard changes",
        ),
      ),
    );
    return form;
  }

  async function loadDevice() {
    try {
      const d = await api("GET", path);
      if (!ctx.stale()) showDevice(d);
      return true;
    } catch (error) {
      if (!ctx.stale()) {
        clear(
          main,
          h("h1", {}, "Device"),
          errorState(error, () => render(ctx)),
        );
      }
      return false;
    }
  }

  const refreshDevice = throttle(loadDevice, 3000);
  const refreshMetrics = throttle(loadMetrics, 10000);
  const refreshConfig = throttle(loadConfig, 2000);
  const refreshHistory = throttle(loadHistory, 3000);
  windowSelect.addEventListener("change", loadMetrics);
  ctx.on("refresh", () => {
    refreshDevice();
    refreshMetrics();
    refreshConfig();
    refreshHistory();
  });
  ctx.on("devices", (data) => {
    const change = data.items.find((d) => d.id === id);
    if (!change || !device) return;
    if (change.removed) {
      clear(
        main,
        h("h1", {}, "Device removed"),
        h("p", {}, "This device no longer exists. ", h("a", { href: "#/devices" }, "Back to the device list.")),
      );
      return;
    }
    const moved = change.status !== device.status || change.state !== device.state || change.health !== device.health;
    // The device reports a configuration in its heartbeats and, at once, in a config_applied event.
    const applied = `${change.config_version} ${change.config_applied_version} ${change.config_error}`;
    // The first change also re-reads: the device may have applied a version between this page's
    // first read and the stream's first event, and waiting for a later difference would miss it.
    if (applied !== appliedSeen) refreshConfig();
    appliedSeen = applied;
    if (change.bundle_version !== (device.bundle?.version ?? null)) refreshHistory();
    if (moved || change.bundle_version !== (device.bundle?.version ?? null)) {
      // The status badge is the point of this page: patch it at once, then re-read the rest.
      Object.assign(device, { status: change.status, state: change.state, last_seen_at: change.last_seen_at });
      showDevice(device);
      refreshDevice();
    } else if (change.last_seen_at !== device.last_seen_at) {
      // A heartbeat: new points for the charts; the facts follow from the newest one.
      device.last_seen_at = change.last_seen_at;
      refreshMetrics();
    }
  });
  ctx.on("targets", (data) => {
    if (data.items.some((t) => t.device_id === id)) refreshHistory();
  });

  if (await loadDevice()) await Promise.all([loadMetrics(), loadHistory(), loadConfig()]);
}

function fact(label, ...value) {
  return h("div", { class: "fact" }, h("dt", {}, label), h("dd", {}, ...value));
}
