// Deployments: the list, creating one with a preview of its targets, and one deployment's live
// per-device progress with cancel. A phased rollout (docs/rollouts.md) shows its state, current
// phase, each phase's progress and why it stopped, and offers approval when a phase waits for it.
// The form deploys to every target at once, or, given phases, as a phased rollout.

import { ApiError, api } from "../api.js";
import {
  add,
  ago,
  badge,
  clear,
  confirmDialog,
  empty,
  errorState,
  field,
  h,
  notify,
  progress,
  readSequence,
  shortId,
  throttle,
  when,
} from "../dom.js";

const ACTIVE = new Set(["pending", "in_progress"]);
const STATUSES = ["", "pending", "in_progress", "succeeded", "failed", "partially_failed", "cancelled"];

export async function renderList(ctx) {
  const { main, params } = ctx;
  const status = h(
    "select",
    { name: "status" },
    STATUSES.map((v) =>
      h(
        "option",
        { value: v, selected: (params.get("status") || "") === v },
        v ? v.replaceAll("_", " ") : "Any status",
      ),
    ),
  );
  const list = h("div", { class: "table-wrap" });
  add(
    main,
    h(
      "div",
      { class: "section-head" },
      h("h1", {}, "Deployments"),
      ctx.can("operator") ? h("a", { class: "button", href: "#/deployments/new" }, "New deployment") : null,
    ),
    h("form", { class: "filters", onsubmit: (e) => e.preventDefault() }, field("Status", status)),
    list,
  );
  let items = [];
  const rows = new Map();

  function show() {
    rows.clear();
    if (!items.length) {
      clear(
        list,
        status.value
          ? empty(`No ${status.value.replaceAll("_", " ")} deployments.`, "Choose “Any status” to see them all.")
          : empty(
              "Nothing has been deployed yet.",
              ctx.can("operator")
                ? "Upload a bundle on the Bundles page, then create a deployment."
                : "An operator creates deployments.",
            ),
      );
      return;
    }
    clear(
      list,
      h(
        "table",
        { class: "table stack" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ["Bundle", "Status", "Progress", "Created"].map((c) => h("th", { scope: "col" }, c)),
          ),
        ),
        h(
          "tbody",
          {},
          items.map((d) => {
            const cells = {
              status: h("td", { "data-label": "Status" }, badge(d.status)),
              progress: h("td", { "data-label": "Progress" }, progress(d.counts, d.total)),
            };
            rows.set(d.id, cells);
            return h(
              "tr",
              { dataset: { deployment: d.id } },
              h(
                "th",
                { scope: "row", "data-label": "Bundle" },
                h("a", { href: `#/deployments/${d.id}` }, `${d.bundle_name} ${d.bundle_version}`),
                d.rollback ? " (rollback)" : "",
              ),
              cells.status,
              cells.progress,
              h("td", { "data-label": "Created" }, ago(d.created_at), d.created_by ? ` by ${d.created_by}` : ""),
            );
          }),
        ),
      ),
    );
  }

  // A live re-read sent before the status filter changed must not draw the old filter's list.
  const reads = readSequence();
  async function load() {
    const latest = reads.start();
    try {
      const page = await api("GET", "/api/v1/deployments", { params: { status: status.value, limit: 100 } });
      if (ctx.stale() || !latest()) return;
      items = page.items;
      show();
    } catch (error) {
      if (!ctx.stale() && latest()) clear(list, errorState(error, load));
    }
  }
  const reload = throttle(load, 3000);
  status.addEventListener("change", () => {
    history.replaceState(null, "", `#/deployments${status.value ? `?status=${status.value}` : ""}`);
    load();
  });
  ctx.on("refresh", reload);
  ctx.on("deployments", (data) => {
    for (const change of data.items) {
      const d = items.find((x) => x.id === change.id);
      if (!d) {
        reload();
        continue;
      }
      Object.assign(d, change);
      const cells = rows.get(d.id);
      clear(cells.status, badge(d.status));
      clear(cells.progress, progress(d.counts, d.total));
      if (status.value && d.status !== status.value) reload();
    }
  });
  await load();
}

export async function renderNew(ctx) {
  const { main, params } = ctx;
  add(
    main,
    h("p", { class: "crumbs" }, h("a", { href: "#/deployments" }, "Deployments"), " / "),
    h("h1", {}, "New deployment"),
  );
  if (!ctx.can("operator")) {
    add(main, empty("Creating deployments needs the operator role.", "Ask an admin to change your role."));
    return;
  }
  let bundles;
  let devices;
  try {
    [bundles, devices] = await Promise.all([
      api("GET", "/api/v1/bundles", { params: { limit: 200 } }),
      api("GET", "/api/v1/devices", { params: { state: "active", limit: 500 } }),
    ]);
  } catch (error) {
    add(
      main,
      errorState(error, () => location.reload()),
    );
    return;
  }
  if (ctx.stale()) return;
  const usable = bundles.items.filter((b) => !b.quarantined);
  if (!usable.length) {
    add(
      main,
      empty(
        "There is no bundle to deploy.",
        "Upload one first.",
        h("a", { class: "button", href: "#/bundles" }, "Go to Bundles"),
      ),
    );
    return;
  }
  if (!devices.items.length) {
    add(
      main,
      empty("There is no active device to deploy to.", "Devices appear once an agent registers and is admitted."),
    );
    return;
  }
  const bundle = h(
    "select",
    { name: "bundle", required: true },
    usable.map((b) => h("option", { value: b.id, selected: params.get("bundle") === b.id }, `${b.name} ${b.version}`)),
  );
  const byTags = h("input", { type: "radio", name: "mode", value: "tags" });
  const byDevices = h("input", { type: "radio", name: "mode", value: "devices", checked: true });
  const tags = h("input", { name: "tags", placeholder: "e.g. site-berlin, camera", autocomplete: "off" });
  const filter = h("input", { type: "search", name: "filter", placeholder: "Filter devices", autocomplete: "off" });
  const checks = new Map();
  const deviceList = h(
    "ul",
    { class: "checklist" },
    devices.items.map((d) => {
      const box = h("input", { type: "checkbox", name: "device", value: d.id });
      checks.set(d.id, { box, device: d });
      return h(
        "li",
        { dataset: { device: d.id } },
        h(
          "label",
          {},
          box,
          " ",
          d.name || shortId(d.id),
          " ",
          badge(d.status),
          d.bundle?.version ? h("span", { class: "muted" }, ` · ${d.bundle.version}`) : null,
        ),
      );
    }),
  );
  const selectAll = h("button", { type: "button", class: "secondary" }, "Select all shown");
  const supersede = h("input", { type: "checkbox", name: "supersede" });
  const timeout = h("input", {
    type: "number",
    name: "timeout",
    min: 1,
    max: 604800,
    placeholder: "server default",
    inputmode: "numeric",
  });
  const phases = h("input", { name: "phases", placeholder: "e.g. 1, 10%, 100%", autocomplete: "off" });
  const approval = h("input", { type: "checkbox", name: "approval" });
  const abortPercent = h("input", {
    type: "number",
    name: "abort-percent",
    min: 1,
    max: 100,
    placeholder: "none",
    inputmode: "numeric",
  });
  const rollback = h("input", { type: "checkbox", name: "rollback" });
  const rolloutBox = h(
    "fieldset",
    {},
    h("legend", {}, "Phased rollout (optional)"),
    field(
      "Phases",
      phases,
      "Comma-separated: a share of the targets (10%) or a number of devices (5); the last phase takes the rest. Empty: every target at once.",
    ),
    h("label", { class: "check" }, approval, " Wait for my approval between phases"),
    field("Abort when more than this % of finished devices failed", abortPercent),
    h("label", { class: "check" }, rollback, " On abort, roll updated devices back to their previous bundle"),
  );
  const preview = h("section", { class: "card preview", "aria-labelledby": "preview-h", "aria-live": "polite" });
  const error = h("p", { class: "form-error", role: "alert" });
  const submit = h("button", { type: "submit" }, "Deploy");
  const devicePicker = h("fieldset", {}, h("legend", {}, "Devices"), field("Filter", filter), selectAll, deviceList);
  const tagPicker = h(
    "div",
    {},
    field("Tags", tags, "Every active device carrying all of these tags (comma-separated)."),
  );

  function targets() {
    if (byTags.checked) {
      const wanted = tags.value
        .split(",")
        .map((t) => t.trim())
        .filter(Boolean);
      if (!wanted.length) return [];
      return devices.items.filter((d) => wanted.every((t) => d.tags.includes(t)));
    }
    return [...checks.values()].filter((c) => c.box.checked).map((c) => c.device);
  }

  // "10%" is a share of the targets, "5" a number of devices; null when a part is neither.
  function parsePhases() {
    const parts = phases.value
      .split(",")
      .map((p) => p.trim())
      .filter(Boolean);
    const parsed = parts.map((p) =>
      /^\d+(\.\d+)?%$/.test(p) ? { percent: Number(p.slice(0, -1)) } : /^\d+$/.test(p) ? { devices: Number(p) } : null,
    );
    return parsed.includes(null) ? null : parsed;
  }

  function showPreview() {
    devicePicker.hidden = byTags.checked;
    tagPicker.hidden = !byTags.checked;
    const chosen = targets();
    const offline = chosen.filter((d) => d.status !== "online").length;
    clear(
      preview,
      h("h2", { id: "preview-h" }, `Targets: ${chosen.length} device${chosen.length === 1 ? "" : "s"}`),
      chosen.length
        ? h(
            "ul",
            { class: "plain compact" },
            chosen
              .slice(0, 50)
              .map((d) =>
                h(
                  "li",
                  {},
                  d.name || d.id,
                  " ",
                  badge(d.status),
                  h("span", { class: "muted" }, ` · now ${d.bundle?.version || "no bundle"}`),
                ),
              ),
            chosen.length > 50 ? h("li", { class: "muted" }, `and ${chosen.length - 50} more`) : null,
          )
        : h(
            "p",
            { class: "muted" },
            byTags.checked ? "No active device carries all of these tags." : "Choose at least one device.",
          ),
      offline
        ? h("p", { class: "hint" }, `${offline} of them are not online: they get the update when they reconnect.`)
        : null,
    );
    submit.disabled = !chosen.length;
  }

  filter.addEventListener("input", () => {
    const text = filter.value.trim().toLowerCase();
    for (const [id, { device }] of checks) {
      deviceList.querySelector(`[data-device="${CSS.escape(id)}"]`).hidden =
        Boolean(text) && !`${device.name || ""} ${id}`.toLowerCase().includes(text);
    }
  });
  selectAll.addEventListener("click", () => {
    for (const [id, { box }] of checks)
      if (!deviceList.querySelector(`[data-device="${CSS.escape(id)}"]`).hidden) box.checked = true;
    showPreview();
  });

  const form = h(
    "form",
    {
      class: "card",
      oninput: showPreview,
      onchange: showPreview,
      onsubmit: async (event) => {
        event.preventDefault();
        error.textContent = "";
        const body = { bundle_id: bundle.value, supersede: supersede.checked };
        if (timeout.value) body.timeout_s = Number(timeout.value);
        if (byTags.checked)
          body.tags = tags.value
            .split(",")
            .map((t) => t.trim())
            .filter(Boolean);
        else body.device_ids = targets().map((d) => d.id);
        const planned = parsePhases();
        if (planned === null) {
          error.textContent = "Write each phase as a percentage (10%) or a number of devices (5).";
          phases.focus();
          return;
        }
        if (planned.length) {
          const abort = { rollback: rollback.checked };
          if (abortPercent.value) abort.after_failure_percent = Number(abortPercent.value);
          body.rollout = { phases: planned, require_approval: approval.checked, abort };
        } else if (approval.checked || rollback.checked || abortPercent.value) {
          error.textContent = "Approval, abort and roll back apply to a phased rollout: give its phases.";
          phases.focus();
          return;
        }
        submit.disabled = true;
        try {
          const created = await api("POST", "/api/v1/deployments", { body });
          notify(
            created.rollout
              ? `Rollout over ${created.rollout.phases_total} phases created.`
              : `Deployment to ${created.total} device${created.total === 1 ? "" : "s"} created.`,
          );
          location.hash = `#/deployments/${created.id}`;
        } catch (failure) {
          error.textContent =
            failure instanceof ApiError && failure.status === 409
              ? `${failure.message} Tick “Replace deployments in progress” to supersede them.`
              : failure.message;
          submit.disabled = false;
        }
      },
    },
    field("Bundle", bundle),
    h(
      "fieldset",
      { class: "inline" },
      h("legend", {}, "Choose targets by"),
      h("label", {}, byDevices, " devices"),
      h("label", {}, byTags, " tags"),
    ),
    devicePicker,
    tagPicker,
    h("label", { class: "check" }, supersede, " Replace deployments in progress on these devices"),
    field("Timeout per device (seconds)", timeout),
    rolloutBox,
    error,
    h("div", { class: "actions" }, submit),
  );
  add(main, h("div", { class: "grid-2" }, form, preview));
  showPreview();
}

export async function renderDetail(ctx) {
  const { main } = ctx;
  const id = ctx.args[0];
  const path = `/api/v1/deployments/${encodeURIComponent(id)}`;
  const heading = h("h1", {}, "Deployment");
  const summary = h("section", { class: "card", "aria-label": "Summary" });
  const actions = h("div", { class: "actions" });
  const phasesBox = h("section", { class: "card", "aria-labelledby": "phases-h", hidden: true });
  const targetsBox = h("section", { class: "card", "aria-labelledby": "targets-h" });
  add(
    main,
    h("p", { class: "crumbs" }, h("a", { href: "#/deployments" }, "Deployments"), " / "),
    heading,
    actions,
    summary,
    phasesBox,
    targetsBox,
  );
  let deployment = null;
  let rollout = null;
  const rows = new Map();

  function showSummary() {
    const d = deployment;
    heading.textContent = `${d.rollback ? "Rollback to" : "Deploy"} ${d.bundle_name} ${d.bundle_version}`;
    document.title = `${heading.textContent} · Kernex`;
    clear(
      summary,
      h(
        "dl",
        { class: "facts" },
        fact("Status", h("span", { dataset: { field: "status" } }, badge(d.status))),
        fact("Progress", progress(d.counts, d.total)),
        fact("Bundle", h("a", { href: `#/bundles/${d.bundle_id}` }, `${d.bundle_name} ${d.bundle_version}`)),
        fact("Created", when(d.created_at), d.created_by ? ` by ${d.created_by}` : ""),
        fact("Finished", when(d.finished_at)),
        d.cancelled_at ? fact("Cancelled", when(d.cancelled_at), d.cancelled_by ? ` by ${d.cancelled_by}` : "") : null,
        fact("Timeout per device", `${d.timeout_s} s`),
        d.rollout
          ? fact(
              "Rollout",
              h("span", { dataset: { field: "rollout-state" } }, badge(d.rollout.state)),
              ` phase ${d.rollout.phase + 1} of ${d.rollout.phases_total}`,
            )
          : null,
        d.rollout && d.rollout.stop_reason
          ? fact("Why it stopped", h("span", { dataset: { field: "stop-reason" } }, d.rollout.stop_reason))
          : null,
      ),
    );
    const cancellable = ctx.can("operator") && ACTIVE.has(d.status);
    const approvable = ctx.can("operator") && Boolean(d.rollout) && d.rollout.state === "awaiting_approval";
    const key = `${cancellable}/${approvable}`;
    if (actions.dataset.buttons !== key) {
      actions.dataset.buttons = key;
      clear(
        actions,
        approvable ? h("button", { type: "button", onclick: approve }, `Approve phase ${d.rollout.phase + 2}`) : null,
        cancellable ? h("button", { type: "button", class: "danger", onclick: cancel }, "Cancel deployment") : null,
      );
    }
  }

  async function approve() {
    try {
      rollout = await api("POST", `${path}/approve`);
      notify("Next phase approved.");
      await load();
    } catch (error) {
      notify(error.message, "bad");
    }
  }

  function showPhases() {
    phasesBox.hidden = !rollout;
    if (!rollout) return;
    clear(
      phasesBox,
      h("h2", { id: "phases-h" }, "Phases"),
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "table stack" },
          h("caption", { class: "visually-hidden" }, "Rollout phases: size, state and progress"),
          h(
            "thead",
            {},
            h("tr", {}, ["Phase", "Size", "State", "Progress"].map((c) => h("th", { scope: "col" }, c))),
          ),
          h(
            "tbody",
            {},
            rollout.phases.map((p) =>
              h(
                "tr",
                { dataset: { phase: String(p.index) } },
                h("th", { scope: "row", "data-label": "Phase" }, p.name || `Phase ${p.index + 1}`),
                h("td", { "data-label": "Size" }, p.percent != null ? `${p.percent} %` : `+${p.devices} device${p.devices === 1 ? "" : "s"}`),
                h("td", { "data-label": "State" }, badge(p.state)),
                h("td", { "data-label": "Progress" }, p.total ? progress(p.counts, p.total) : "—"),
              ),
            ),
          ),
        ),
      ),
    );
  }

  async function cancel() {
    if (
      !(await confirmDialog(
        "Cancel this deployment?",
        "Devices that have not finished are told to stop; devices that already installed keep the bundle.",
        "Cancel deployment",
      ))
    )
      return;
    try {
      deployment = await api("POST", `${path}/cancel`);
      notify("Deployment cancelled.");
      showSummary();
      showTargets();
    } catch (error) {
      notify(error.message, "bad");
    }
  }

  function showTargets() {
    rows.clear();
    const targets = deployment.targets;
    clear(targetsBox, h("h2", { id: "targets-h" }, `Devices (${deployment.total})`));
    if (!targets.length) {
      add(targetsBox, empty("This deployment has no targets."));
      return;
    }
    add(
      targetsBox,
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "table stack" },
          h("caption", { class: "visually-hidden" }, "Per-device progress; updates live"),
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              ["Device", "Status", "Error", "Started", "Updated", "Finished"].map((c) => h("th", { scope: "col" }, c)),
            ),
          ),
          h("tbody", {}, targets.map(targetRow)),
        ),
      ),
      deployment.total > targets.length
        ? h("p", { class: "muted" }, `Showing ${targets.length} of ${deployment.total} devices.`)
        : null,
    );
  }

  function targetRow(t) {
    const cells = {
      status: h("td", { "data-label": "Status" }, badge(t.status)),
      error: h("td", { "data-label": "Error" }, t.error || "—"),
      started: h("td", { "data-label": "Started" }, when(t.started_at)),
      updated: h("td", { "data-label": "Updated" }, ago(t.updated_at)),
      finished: h("td", { "data-label": "Finished" }, when(t.finished_at)),
    };
    rows.set(t.device_id, cells);
    return h(
      "tr",
      { dataset: { target: t.device_id } },
      h(
        "th",
        { scope: "row", "data-label": "Device" },
        h("a", { href: `#/devices/${encodeURIComponent(t.device_id)}` }, shortId(t.device_id)),
      ),
      cells.status,
      cells.error,
      cells.started,
      cells.updated,
      cells.finished,
    );
  }

  async function load() {
    try {
      const d = await api("GET", path);
      const r = d.rollout ? await api("GET", `${path}/rollout`) : null;
      if (ctx.stale()) return;
      deployment = d;
      rollout = r;
      showSummary();
      showPhases();
      showTargets();
    } catch (error) {
      if (!ctx.stale()) clear(summary, errorState(error, load));
    }
  }
  // Timestamps (started, finished) are only in the full read: re-read now and then while it moves.
  const reload = throttle(load, 5000);

  ctx.on("refresh", reload);
  ctx.on("deployments", (data) => {
    const change = data.items.find((d) => d.id === id);
    if (!change || !deployment) return;
    Object.assign(deployment, change);
    showSummary();
    // A rollout's next phase adds devices; its state is only in the full read.
    if (!ACTIVE.has(change.status) || deployment.rollout || change.total !== rows.size) reload();
  });
  ctx.on("targets", (data) => {
    let touched = false;
    for (const t of data.items) {
      if (t.deployment_id !== id) continue;
      const cells = rows.get(t.device_id);
      if (!cells) continue;
      touched = true;
      clear(cells.status, badge(t.status));
      cells.error.textContent = t.error || "—";
      clear(cells.updated, ago(t.updated_at));
    }
    if (touched) reload();
  });
  await load();
}

function fact(label, ...value) {
  return h("div", { class: "fact" }, h("dt", {}, label), h("dd", {}, ...value));
}
