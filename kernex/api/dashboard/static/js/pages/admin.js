// Admin pages: user accounts (create, change role, disable) and API tokens (create, revoke).

import { api } from "../api.js";
import { add, ago, badge, clear, confirmDialog, empty, errorState, field, h, notify, when } from "../dom.js";

const ROLES = ["viewer", "operator", "admin"];

function adminOnly(ctx, title) {
  add(ctx.main, h("h1", {}, title));
  if (ctx.can("admin")) return true;
  add(ctx.main, empty(`${title} are managed by admins.`, "Ask an admin for changes."));
  return false;
}

export async function renderUsers(ctx) {
  if (!adminOnly(ctx, "Users")) return;
  const list = h("div", { class: "table-wrap" });
  const username = h("input", {
    name: "username",
    autocomplete: "off",
    required: true,
    pattern: "[A-Za-z0-9][A-Za-z0-9._@\\-]{2,127}",
  });
  const password = h("input", {
    name: "password",
    type: "password",
    autocomplete: "new-password",
    required: true,
    minlength: 12,
  });
  const role = h(
    "select",
    { name: "role" },
    ROLES.map((r) => h("option", { value: r }, r)),
  );
  const error = h("p", { class: "form-error", role: "alert" });
  const form = h(
    "form",
    {
      class: "card",
      onsubmit: async (event) => {
        event.preventDefault();
        error.textContent = "";
        try {
          const user = await api("POST", "/api/v1/auth/register", {
            body: { username: username.value, password: password.value, role: role.value },
          });
          notify(`Account ${user.username} created.`);
          form.reset();
          load();
        } catch (failure) {
          error.textContent = failure.message;
        }
      },
    },
    h("h2", {}, "Add a user"),
    h(
      "div",
      { class: "form-grid" },
      field("Username", username, "3–128 letters, digits, . _ @ -"),
      field("Password", password, "At least 12 characters."),
      field("Role", role),
    ),
    error,
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Create account")),
  );
  add(ctx.main, list, form);

  async function update(user, body, message) {
    try {
      await api("PATCH", `/api/v1/users/${user.id}`, { body });
      notify(message);
    } catch (failure) {
      notify(failure.message, "bad");
    }
    load();
  }

  async function load() {
    try {
      const page = await api("GET", "/api/v1/users");
      if (ctx.stale()) return;
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
              ["User", "Role", "Status", "Created", "Actions"].map((c) => h("th", { scope: "col" }, c)),
            ),
          ),
          h(
            "tbody",
            {},
            page.items.map((u) => {
              const self = u.id === ctx.me.id;
              const select = h(
                "select",
                { "aria-label": `Role of ${u.username}`, disabled: self },
                ROLES.map((r) => h("option", { value: r, selected: u.role === r }, r)),
              );
              select.addEventListener("change", () =>
                update(u, { role: select.value }, `${u.username} is now ${select.value}.`),
              );
              return h(
                "tr",
                {},
                h("th", { scope: "row", "data-label": "User" }, u.username, self ? " (you)" : ""),
                h("td", { "data-label": "Role" }, select),
                h("td", { "data-label": "Status" }, u.disabled ? badge("revoked") : badge("active")),
                h("td", { "data-label": "Created" }, when(u.created_at)),
                h(
                  "td",
                  { "data-label": "Actions" },
                  self
                    ? h("span", { class: "muted" }, "—")
                    : h(
                        "button",
                        {
                          type: "button",
                          class: u.disabled ? "secondary" : "danger",
                          onclick: () =>
                            update(
                              u,
                              { disabled: !u.disabled },
                              `${u.username} ${u.disabled ? "enabled" : "disabled"}.`,
                            ),
                        },
                        u.disabled ? "Enable" : "Disable",
                      ),
                ),
              );
            }),
          ),
        ),
      );
    } catch (failure) {
      if (!ctx.stale()) clear(list, errorState(failure, load));
    }
  }
  await load();
}

export async function renderTokens(ctx) {
  if (!adminOnly(ctx, "API tokens")) return;
  const list = h("div", { class: "table-wrap" });
  const name = h("input", { name: "name", autocomplete: "off", required: true, maxlength: 128 });
  const scope = h(
    "select",
    { name: "scope" },
    h("option", { value: "read" }, "read (viewer)"),
    h("option", { value: "operator" }, "operator"),
  );
  const days = h("input", {
    name: "days",
    type: "number",
    min: 1,
    max: 3650,
    placeholder: "never",
    inputmode: "numeric",
  });
  const error = h("p", { class: "form-error", role: "alert" });
  const created = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    {
      class: "card",
      onsubmit: async (event) => {
        event.preventDefault();
        error.textContent = "";
        const body = { name: name.value.trim(), scope: scope.value };
        if (days.value) body.expires_in_days = Number(days.value);
        try {
          const token = await api("POST", "/api/v1/tokens", { body });
          form.reset();
          const value = h("input", {
            readonly: true,
            value: token.token,
            class: "mono",
            "aria-label": "The new token",
          });
          clear(
            created,
            h(
              "div",
              { class: "card tone-warn-border" },
              h("h2", {}, `Token “${token.name}” created`),
              h("p", {}, "Copy it now: it is shown only once. Send it as Authorization: Bearer <token>."),
              value,
              h(
                "div",
                { class: "actions" },
                h(
                  "button",
                  {
                    type: "button",
                    class: "secondary",
                    onclick: () => navigator.clipboard?.writeText(token.token).then(() => notify("Copied.")),
                  },
                  "Copy",
                ),
              ),
            ),
          );
          value.select();
          load();
        } catch (failure) {
          error.textContent = failure.message;
        }
      },
    },
    h("h2", {}, "Create a token"),
    h(
      "div",
      { class: "form-grid" },
      field("Name", name, "What uses it, e.g. grafana or ci-deploy."),
      field("Scope", scope),
      field("Expires in (days)", days),
    ),
    error,
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Create token")),
  );
  add(ctx.main, created, list, form);

  async function load() {
    try {
      const page = await api("GET", "/api/v1/tokens");
      if (ctx.stale()) return;
      if (!page.items.length) {
        clear(
          list,
          empty(
            "No API tokens yet.",
            "Create one below for scripts and integrations; people sign in with their own account instead.",
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
              ["Name", "Scope", "Status", "Created", "Last used", "Expires", "Actions"].map((c) =>
                h("th", { scope: "col" }, c),
              ),
            ),
          ),
          h(
            "tbody",
            {},
            page.items.map((t) =>
              h(
                "tr",
                {},
                h("th", { scope: "row", "data-label": "Name" }, t.name),
                h("td", { "data-label": "Scope" }, t.scope),
                h("td", { "data-label": "Status" }, t.revoked_at ? badge("revoked") : badge("active")),
                h("td", { "data-label": "Created" }, when(t.created_at), ` by ${t.created_by}`),
                h("td", { "data-label": "Last used" }, t.last_used_at ? ago(t.last_used_at) : "never"),
                h("td", { "data-label": "Expires" }, t.expires_at ? when(t.expires_at) : "never"),
                h(
                  "td",
                  { "data-label": "Actions" },
                  t.revoked_at
                    ? "—"
                    : h(
                        "button",
                        {
                          type: "button",
                          class: "danger",
                          onclick: async () => {
                            if (
                              !(await confirmDialog(
                                "Revoke this token?",
                                `Anything using “${t.name}” stops working at once.`,
                                "Revoke",
                              ))
                            )
                              return;
                            try {
                              await api("DELETE", `/api/v1/tokens/${t.id}`);
                              notify(`Token ${t.name} revoked.`);
                            } catch (failure) {
                              notify(failure.message, "bad");
                            }
                            load();
                          },
                        },
                        "Revoke",
                      ),
                ),
              ),
            ),
          ),
        ),
      );
    } catch (failure) {
      if (!ctx.stale()) clear(list, errorState(failure, load));
    }
  }
  await load();
}
