// Device list: filter by status and admission state, search, sort, page; rows update live.

import { api } from "../api.js";
import {
  add,
  ago,
  badge,
  clear,
  debounce,
  empty,
  errorState,
  field,
  h,
  readSequence,
  shortId,
  throttle,
} from "../dom.js";

const PAGE = 100;
const SORTS = {
  name: (a, b) => (a.name || a.id).localeCompare(b.name || b.id),
  status: (a, b) => a.status.localeCompare(b.status) || SORTS.name(a, b),
  last_seen: (a, b) => (Date.parse(b.last_seen_at || 0) || 0) - (Date.parse(a.last_seen_at || 0) || 0),
  version: (a, b) => (a.bundle?.version || "").localeCompare(b.bundle?.version || "", undefined, { numeric: true }),
};

export async function render(ctx) {
  const { main, params } = ctx;
  const status = h(
    "select",
    { name: "status" },
    ["", "online", "offline", "unknown"].map((v) =>
      h("option", { value: v, selected: params.get("status") === v }, v || "Any status"),
    ),
  );
  const state = h(
    "select",
    { name: "state" },
    ["", "active", "pending", "rejected", "revoked"].map((v) =>
      h("option", { value: v, selected: params.get("state") === v }, v || "Any admission state"),
    ),
  );
  const search = h("input", {
    type: "search",
    name: "q",
    value: params.get("q") || "",
    placeholder: "Name or id",
    autocomplete: "off",
  });
  const sort = h(
    "select",
    { name: "sort" },
    [
      ["name", "Name"],
      ["status", "Status"],
      ["last_seen", "Last seen"],
      ["version", "Version"],
    ].map(([v, label]) => h("option", { value: v, selected: (params.get("sort") || "name") === v }, label)),
  );
  const summary = h("p", { class: "muted", role: "status" });
  const list = h("div", { class: "table-wrap" });
  const pager = h("div", { class: "pager" });
  add(
    main,
    h("h1", {}, "Devices"),
    h(
      "form",
      { class: "filters", role: "search", onsubmit: (e) => e.preventDefault() },
      field("Status", status),
      field("Admission", state),
      field("Search", search),
      field("Sort by", sort),
    ),
    summary,
    list,
    pager,
  );

  let offset = Number(params.get("offset")) || 0;
  let items = [];
  let total = 0;
  const rows = new Map();

  function row(d) {
    const cells = {
      status: h("td", { "data-label": "Status" }, badge(d.status)),
      seen: h("td", { "data-label": "Last seen" }, ago(d.last_seen_at)),
      version: h("td", { "data-label": "Version" }, d.bundle?.version || "—"),
    };
    const tr = h(
      "tr",
      { dataset: { device: d.id } },
      h(
        "th",
        { scope: "row", "data-label": "Device" },
        h("a", { href: `#/devices/${encodeURIComponent(d.id)}` }, d.name || shortId(d.id)),
        h("span", { class: "muted mono small" }, shortId(d.id)),
      ),
      cells.status,
      h("td", { "data-label": "Admission" }, badge(d.state)),
      cells.version,
      cells.seen,
      h("td", { "data-label": "Tags" }, d.tags.length ? d.tags.join(", ") : "—"),
    );
    rows.set(d.id, { tr, cells, device: d });
    return tr;
  }

  function show() {
    rows.clear();
    // The page comes sorted by the API; re-sorting it keeps rows in order as live updates arrive.
    const sorted = [...items].sort(SORTS[sort.value] || SORTS.name);
    summary.textContent = total
      ? `${total} device${total === 1 ? "" : "s"}${total > PAGE ? `, showing ${offset + 1}–${Math.min(offset + PAGE, total)}` : ""}`
      : "";
    if (!sorted.length) {
      const filtered = status.value || state.value || search.value;
      clear(
        list,
        filtered
          ? empty("No device matches these filters.", "Clear the search or choose “Any status” to see the whole fleet.")
          : empty(
              "No devices have registered yet.",
              "Run `kernex agent run --api <this server's URL>` on a device, or `kernex up --devices 3` to try simulated ones.",
            ),
      );
    } else {
      clear(
        list,
        h(
          "table",
          { class: "table stack" },
          h("caption", { class: "visually-hidden" }, "Devices; status and last seen update live"),
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              ["Device", "Status", "Admission", "Version", "Last seen", "Tags"].map((c) =>
                h("th", { scope: "col" }, c),
              ),
            ),
          ),
          h("tbody", {}, sorted.map(row)),
        ),
      );
    }
    clear(
      pager,
      offset > 0
        ? h(
            "button",
            { type: "button", class: "secondary", onclick: () => go(Math.max(0, offset - PAGE)) },
            "Previous page",
          )
        : null,
      offset + PAGE < total
        ? h("button", { type: "button", class: "secondary", onclick: () => go(offset + PAGE) }, "Next page")
        : null,
    );
  }

  // A live re-read sent before the filters changed must not draw the old filter's page.
  const reads = readSequence();
  async function load() {
    const latest = reads.start();
    try {
      const page = await api("GET", "/api/v1/devices", {
        params: { status: status.value, state: state.value, q: search.value.trim(), sort: sort.value, limit: PAGE, offset },
      });
      if (ctx.stale() || !latest()) return;
      items = page.items;
      total = page.total;
      show();
    } catch (error) {
      if (!ctx.stale() && latest()) clear(list, errorState(error, load));
    }
  }
  const reload = throttle(load, 3000);

  function go(newOffset) {
    offset = newOffset;
    // The filters live in the URL, so reload, back and shared links keep them.
    const query = new URLSearchParams();
    for (const [key, el] of [
      ["status", status],
      ["state", state],
      ["q", search],
      ["sort", sort],
    ])
      if (el.value) query.set(key, el.value);
    if (offset) query.set("offset", String(offset));
    history.replaceState(null, "", `#/devices${query.toString() ? `?${query}` : ""}`);
    load();
  }

  status.addEventListener("change", () => go(0));
  state.addEventListener("change", () => go(0));
  search.addEventListener(
    "input",
    debounce(() => go(0), 300),
  );
  // The API sorts the whole list, so a new order starts again at its first page.
  sort.addEventListener("change", () => go(0));

  ctx.on("refresh", reload);
  ctx.on("devices", (data) => {
    let refetch = false;
    for (const change of data.items) {
      const known = rows.get(change.id);
      if (!known) {
        // A new device on this page's view, or one that now matches the filter.
        if (!change.removed && !offset) refetch = true;
        continue;
      }
      if (
        change.removed ||
        (status.value && change.status !== status.value) ||
        (state.value && change.state !== state.value)
      ) {
        refetch = true;
        continue;
      }
      const d = known.device;
      if (d.status !== change.status) clear(known.cells.status, badge(change.status));
      if (d.last_seen_at !== change.last_seen_at) clear(known.cells.seen, ago(change.last_seen_at));
      if ((d.bundle?.version || null) !== change.bundle_version)
        known.cells.version.textContent = change.bundle_version || "—";
      Object.assign(d, {
        status: change.status,
        state: change.state,
        last_seen_at: change.last_seen_at,
        bundle: { ...d.bundle, version: change.bundle_version },
      });
    }
    if (refetch) reload();
  });
  await load();
}
