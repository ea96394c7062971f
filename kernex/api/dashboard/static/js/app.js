// The shell: sign-in, navigation, hash routes, the live feed's indicator, and page lifecycles.
//
// Routes live in the URL fragment (#/devices/abc) so the server serves one page and a reload or
// a shared link opens the same view. Each page module exports render(ctx); ctx.on() registers
// live listeners that are removed when the viewer navigates away.

import { ApiError, api, clearSession, saveSession, session } from "./api.js";
import { clear, field, h, notify, tickRelativeTimes, timeZone } from "./dom.js";
import { Live } from "./live.js";
import * as admin from "./pages/admin.js";
import * as audit from "./pages/audit.js";
import * as bundles from "./pages/bundles.js";
import * as deployments from "./pages/deployments.js";
import * as device from "./pages/device.js";
import * as devices from "./pages/devices.js";
import * as overview from "./pages/overview.js";

const ROUTES = [
  [/^\/?$/, overview.render, "overview"],
  [/^\/devices$/, devices.render, "devices"],
  [/^\/devices\/([^/]+)$/, device.render, "devices"],
  [/^\/bundles$/, bundles.renderList, "bundles"],
  [/^\/bundles\/([^/]+)$/, bundles.renderDetail, "bundles"],
  [/^\/deployments$/, deployments.renderList, "deployments"],
  [/^\/deployments\/new$/, deployments.renderNew, "deployments"],
  [/^\/deployments\/([^/]+)$/, deployments.renderDetail, "deployments"],
  [/^\/audit$/, audit.render, "audit"],
  [/^\/users$/, admin.renderUsers, "users"],
  [/^\/tokens$/, admin.renderTokens, "tokens"],
];

const NAV = [
  ["overview", "#/", "Overview"],
  ["devices", "#/devices", "Devices"],
  ["bundles", "#/bundles", "Bundles"],
  ["deployments", "#/deployments", "Deployments"],
  ["audit", "#/audit", "Audit log", "admin"],
  ["users", "#/users", "Users", "admin"],
  ["tokens", "#/tokens", "API tokens", "admin"],
];

const ROLE_RANK = { viewer: 0, operator: 1, admin: 2 };

let me = null;
let live = null;
let cleanups = [];
let renderCount = 0;

function parseHash() {
  const raw = decodeURIComponent(location.hash.replace(/^#/, "")) || "/";
  const [path, search = ""] = raw.split("?");
  return { path, params: new URLSearchParams(search) };
}

function showLogin(message) {
  if (live) live.stop();
  live = null;
  me = null;
  document.title = "Sign in · Kernex";
  const username = h("input", { name: "username", autocomplete: "username", required: true });
  const password = h("input", { name: "password", type: "password", autocomplete: "current-password", required: true });
  const error = h("p", { class: "form-error", role: "alert" }, message || "");
  const button = h("button", { type: "submit" }, "Sign in");
  const form = h(
    "form",
    {
      class: "login card",
      onsubmit: async (event) => {
        event.preventDefault();
        button.disabled = true;
        error.textContent = "";
        try {
          const token = await api("POST", "/api/v1/auth/login", {
            body: { username: username.value, password: password.value },
            auth: false,
          });
          saveSession(token.access_token, token.expires_at);
          await start();
        } catch (failure) {
          error.textContent =
            failure instanceof ApiError && failure.status === 401
              ? "Wrong username or password."
              : failure.message || "Sign-in failed.";
          button.disabled = false;
          password.focus();
        }
      },
    },
    h("h1", {}, "Kernex"),
    h("p", { class: "muted" }, "Sign in to manage your fleet."),
    field("Username", username),
    field("Password", password),
    error,
    button,
  );
  clear(document.getElementById("app"), h("main", { id: "main", class: "login-page", tabindex: "-1" }, form));
  username.focus();
}

function shell() {
  const status = h("span", { class: "live-state", role: "status", "aria-live": "polite" }, "Connecting…");
  const nav = h(
    "ul",
    { class: "nav-list" },
    NAV.filter(([, , , role]) => !role || ROLE_RANK[me.role] >= ROLE_RANK[role]).map(([key, href, label]) =>
      h("li", {}, h("a", { href, dataset: { nav: key } }, label)),
    ),
  );
  const menu = h(
    "button",
    { type: "button", class: "menu-toggle secondary", "aria-expanded": "false", "aria-controls": "nav" },
    "Menu",
  );
  const navBox = h("nav", { id: "nav", "aria-label": "Main" }, nav);
  menu.addEventListener("click", () => {
    const open = menu.getAttribute("aria-expanded") !== "true";
    menu.setAttribute("aria-expanded", String(open));
    navBox.classList.toggle("open", open);
  });
  nav.addEventListener("click", () => {
    menu.setAttribute("aria-expanded", "false");
    navBox.classList.remove("open");
  });
  const signOut = h("button", { type: "button", class: "secondary", onclick: logout }, "Sign out");
  clear(
    document.getElementById("app"),
    h(
      "header",
      { class: "topbar" },
      h("a", { href: "#/", class: "brand" }, "Kernex"),
      menu,
      navBox,
      h("div", { class: "who" }, status, h("span", { class: "user" }, `${me.name} (${me.role})`), signOut),
    ),
    h("div", { id: "notices", class: "notices", "aria-live": "polite" }),
    h("main", { id: "main", tabindex: "-1" }),
    h(
      "footer",
      { class: "footer muted" },
      `Times are shown in ${timeZone}. `,
      h("a", { href: "/docs" }, "API documentation"),
    ),
  );
  live.on("connection", (state) => {
    status.dataset.state = state;
    status.textContent = state === "live" ? "Live" : state === "reconnecting" ? "Reconnecting…" : "Connecting…";
  });
}

async function logout() {
  try {
    await api("POST", "/api/v1/auth/logout");
  } catch {
    // Signed out locally either way.
  }
  clearSession();
  showLogin("You are signed out.");
}

async function route() {
  // Only "#/..." is a route; any other fragment is an in-page anchor and leaves the page as it is.
  if (!me || (location.hash && !location.hash.startsWith("#/"))) return;
  for (const fn of cleanups) fn();
  cleanups = [];
  renderCount += 1;
  const current = renderCount;
  const { path, params } = parseHash();
  const found = ROUTES.map(([pattern, render, nav]) => [path.match(pattern), render, nav]).find(([match]) => match);
  const main = document.getElementById("main");
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (found && link.dataset.nav === found[2]) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  clear(main);
  if (!found) {
    clear(
      main,
      h("h1", {}, "Page not found"),
      h("p", {}, "There is nothing at this address. ", h("a", { href: "#/" }, "Go to the overview.")),
    );
    return;
  }
  const [match, render] = found;
  const ctx = {
    main,
    params,
    args: match.slice(1),
    me,
    can: (role) => ROLE_RANK[me.role] >= ROLE_RANK[role],
    // Live listeners and timers registered here end with the page.
    on: (type, fn) => cleanups.push(live.on(type, fn)),
    cleanup: (fn) => cleanups.push(fn),
    stale: () => current !== renderCount,
  };
  try {
    await render(ctx);
  } catch (error) {
    console.error(error);
    if (!ctx.stale()) notify(error.message || "Something went wrong", "bad");
  }
  // Move focus to the new page's heading, as a page load would, for keyboard and reader users.
  const heading = main.querySelector("h1");
  if (heading && !ctx.stale() && document.activeElement !== main && !main.contains(document.activeElement)) {
    heading.setAttribute("tabindex", "-1");
    heading.focus({ preventScroll: true });
  }
}

async function start() {
  if (!session()) {
    showLogin();
    return;
  }
  try {
    me = await api("GET", "/api/v1/auth/me");
  } catch (error) {
    if (error.status !== 401) showLogin(error.message);
    return;
  }
  live = new Live(() => showLogin("Your session has ended. Sign in again."));
  shell();
  live.start();
  await route();
}

window.addEventListener("hashchange", route);
// The skip link moves focus without touching the URL fragment, which holds the route.
document.querySelector(".skip").addEventListener("click", (event) => {
  event.preventDefault();
  document.getElementById("main").focus();
});
window.addEventListener("kernex:unauthorized", (event) => showLogin(event.detail));
setInterval(tickRelativeTimes, 5000);
start();
