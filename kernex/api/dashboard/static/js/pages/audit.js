// The audit log (admins): who did what, when, from where, filtered and paged.

import { api } from "../api.js";
import { add, clear, empty, errorState, field, h, readSequence, when } from "../dom.js";

const PAGE = 50;

export async function render(ctx) {
  const { main } = ctx;
  add(main, h("h1", {}, "Audit log"));
  if (!ctx.can("admin")) {
    add(main, empty("The audit log is for admins.", "Ask an admin if you need to see who changed what."));
    return;
  }
  const actor = h("input", { name: "actor", autocomplete: "off" });
  const action = h("input", { name: "action", autocomplete: "off", placeholder: "e.g. deployment.create" });
  const outcome = h(
    "select",
    { name: "outcome" },
    ["", "success", "denied", "failed"].map((v) => h("option", { value: v }, v || "Any outcome")),
  );
  const list = h("div", { class: "table-wrap" });
  const pager = h("div", { class: "pager" });
  const summary = h("p", { class: "muted", role: "status" });
  let offset = 0;
  add(
    main,
    h(
      "form",
      {
        class: "filters",
        onsubmit: (e) => {
          e.preventDefault();
          offset = 0;
          load();
        },
      },
      field("Actor", actor),
      field("Action", action),
      field("Outcome", outcome),
      h("div", { class: "field" }, h("button", { type: "submit" }, "Filter")),
    ),
    summary,
    list,
    pager,
  );

  // Filtering or paging again before an answer came: only the newest read is drawn.
  const reads = readSequence();
  async function load() {
    const latest = reads.start();
    try {
      const page = await api("GET", "/api/v1/audit", {
        params: { actor: actor.value.trim(), action: action.value.trim(), outcome: outcome.value, limit: PAGE, offset },
      });
      if (ctx.stale() || !latest()) return;
      summary.textContent = page.total ? `${page.total} entries, newest first` : "";
      clear(
        list,
        page.items.length
          ? h(
              "table",
              { class: "table stack" },
              h(
                "thead",
                {},
                h(
                  "tr",
                  {},
                  ["When", "Actor", "Action", "Target", "Outcome", "From", "Details"].map((c) =>
                    h("th", { scope: "col" }, c),
                  ),
                ),
              ),
              h(
                "tbody",
                {},
                page.items.map((e) =>
                  h(
                    "tr",
                    {},
                    h("td", { "data-label": "When" }, when(e.at)),
                    h("td", { "data-label": "Actor" }, e.actor),
                    h("td", { "data-label": "Action", class: "mono small" }, e.action),
                    h("td", { "data-label": "Target", class: "mono small break" }, e.target || "—"),
                    h(
                      "td",
                      { "data-label": "Outcome" },
                      h(
                        "span",
                        {
                          class: `badge tone-${e.outcome === "success" ? "good" : e.outcome === "denied" ? "bad" : "warn"}`,
                        },
                        e.outcome,
                      ),
                    ),
                    h("td", { "data-label": "From" }, e.address || "—"),
                    h(
                      "td",
                      { "data-label": "Details", class: "mono small break" },
                      Object.keys(e.details || {}).length ? JSON.stringify(e.details) : "—",
                    ),
                  ),
                ),
              ),
            )
          : empty("No audit entries match.", "Clear the filters to see everything recorded."),
      );
      clear(
        pager,
        offset > 0
          ? h(
              "button",
              {
                type: "button",
                class: "secondary",
                onclick: () => {
                  offset = Math.max(0, offset - PAGE);
                  load();
                },
              },
              "Newer",
            )
          : null,
        offset + PAGE < page.total
          ? h(
              "button",
              {
                type: "button",
                class: "secondary",
                onclick: () => {
                  offset += PAGE;
                  load();
                },
              },
              "Older",
            )
          : null,
      );
    } catch (error) {
      if (!ctx.stale() && latest()) clear(list, errorState(error, load));
    }
  }
  await load();
}
