// Building the page: elements from data (never from HTML strings, so fleet data cannot inject
// markup), formatting in the viewer's locale and time zone, and the shared bits of every page.

// h("a", { href: "#/devices", class: "x", onclick: fn }, "text", child, [more]) -> Element
export function h(tag, attrs, ...children) {
  const svg = tag.startsWith("svg:");
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "value" && !svg) el.value = value;
    else if (key === "checked" || key === "selected" || key === "disabled") el[key] = Boolean(value);
    else el.setAttribute(key === "className" ? "class" : key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

// Like Element.append, but skips null/false children instead of writing them out as text.
export function add(el, ...children) {
  append(el, children);
  return el;
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// Times: shown in the viewer's own zone (the browser's), with the zone named once in the footer.
export const timeZone = Intl.DateTimeFormat().resolvedOptions().timeZone;
const absolute = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
const numbers = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });

export function formatTime(iso) {
  return iso ? absolute.format(new Date(iso)) : "—";
}

export function formatClock(ms) {
  return clock.format(new Date(ms));
}

export function formatAgo(iso) {
  if (!iso) return "never";
  const seconds = Math.round((Date.parse(iso) - Date.now()) / 1000);
  const steps = [
    [60, "second"],
    [60, "minute"],
    [24, "hour"],
    [7, "day"],
  ];
  let amount = seconds;
  for (const [size, unit] of steps) {
    if (Math.abs(amount) < size) return relative.format(unit === "second" && Math.abs(amount) < 5 ? 0 : amount, unit);
    amount = Math.round(amount / size);
  }
  return relative.format(amount, "week");
}

// <time> that says "12 seconds ago" and keeps saying the truth (see tickRelativeTimes).
export function ago(iso) {
  return h("time", { datetime: iso || "", title: formatTime(iso), dataset: { relative: "" } }, formatAgo(iso));
}

export function when(iso) {
  return iso ? h("time", { datetime: iso }, formatTime(iso)) : "—";
}

export function tickRelativeTimes() {
  for (const el of document.querySelectorAll("time[data-relative]")) {
    el.textContent = formatAgo(el.getAttribute("datetime"));
  }
}

export function formatNumber(value, unit = "") {
  if (value === null || value === undefined) return "—";
  return `${numbers.format(value)}${unit ? ` ${unit}` : ""}`;
}

export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let index = 0;
  while (value >= 1024 && index < units.length - 1) {
    value /= 1024;
    index += 1;
  }
  return `${numbers.format(value)} ${units[index]}`;
}

export function shortId(id) {
  return id && id.length > 12 ? `${id.slice(0, 12)}…` : id || "—";
}

// Status words get a colour class and keep their text: colour is never the only signal.
const TONES = {
  online: "good",
  succeeded: "good",
  active: "good",
  ok: "good",
  applied: "good",
  offline: "bad",
  failed: "bad",
  rolled_back: "bad",
  refused: "bad",
  rejected: "bad",
  revoked: "bad",
  partially_failed: "warn",
  quarantined: "bad",
  pending: "info",
  in_progress: "info",
  downloading: "info",
  verifying: "info",
  installing: "info",
  health_checking: "info",
  cancelled: "muted",
  queued: "muted",
  running: "info",
  soaking: "info",
  awaiting_approval: "warn",
  completed: "good",
  passed: "good",
  aborted: "bad",
  stopped: "bad",
  superseded: "muted",
  unknown: "muted",
};

export function badge(status) {
  const text = status ? String(status).replaceAll("_", " ") : "—";
  return h("span", { class: `badge tone-${TONES[status] || "muted"}`, dataset: { status: status || "" } }, text);
}

export function setBadge(el, status) {
  el.replaceWith(badge(status));
}

// A progress bar from counts by target status: the widths are set through the CSSOM (allowed
// by the page's CSP, unlike inline style attributes).
export function progress(counts, total) {
  const done = (counts && counts.succeeded) || 0;
  const bad = ["failed", "rolled_back", "refused"].reduce((sum, key) => sum + ((counts && counts[key]) || 0), 0);
  const bar = h("div", {
    class: "bar",
    role: "img",
    "aria-label": `${done} of ${total} succeeded, ${bad} failed`,
  });
  const good = h("span", { class: "bar-good" });
  const failed = h("span", { class: "bar-bad" });
  good.style.width = `${total ? (100 * done) / total : 0}%`;
  failed.style.width = `${total ? (100 * bad) / total : 0}%`;
  bar.append(good, failed);
  return h(
    "div",
    { class: "progress" },
    bar,
    h("span", { class: "progress-text" }, `${done}/${total} succeeded${bad ? `, ${bad} failed` : ""}`),
  );
}

// Empty and error states say what happened and what to do next.
export function empty(title, hint, action) {
  return h(
    "div",
    { class: "state state-empty", role: "status" },
    h("p", { class: "state-title" }, title),
    hint ? h("p", {}, hint) : null,
    action || null,
  );
}

export function errorState(error, retry) {
  const hint =
    error && error.status === 403
      ? "Your role does not allow this. Ask an admin for access."
      : error && error.status === 404
        ? "It may have been deleted, or the link is wrong."
        : "Check your connection, then try again.";
  return h(
    "div",
    { class: "state state-error", role: "alert" },
    h("p", { class: "state-title" }, (error && error.message) || "Something went wrong."),
    h("p", {}, hint, error && error.requestId ? ` (request ${error.requestId})` : ""),
    retry ? h("button", { type: "button", onclick: retry }, "Try again") : null,
  );
}

// A notice in the page's live region, read out by screen readers.
export function notify(message, tone = "good") {
  const region = document.getElementById("notices");
  if (!region) return;
  const note = h("p", { class: `notice tone-${tone}` }, message);
  region.append(note);
  setTimeout(() => note.remove(), 6000);
}

// confirm() without the browser's blocking dialog: a <dialog> that traps focus natively.
export function confirmDialog(title, text, confirmLabel = "Confirm") {
  return new Promise((resolve) => {
    const dialog = h(
      "dialog",
      { class: "dialog", "aria-labelledby": "dialog-title" },
      h(
        "form",
        { method: "dialog" },
        h("h2", { id: "dialog-title" }, title),
        h("p", {}, text),
        h(
          "div",
          { class: "actions" },
          h("button", { value: "cancel", type: "submit", class: "secondary" }, "Cancel"),
          h("button", { value: "ok", type: "submit", class: "danger" }, confirmLabel),
        ),
      ),
    );
    dialog.addEventListener("close", () => {
      resolve(dialog.returnValue === "ok");
      dialog.remove();
    });
    document.body.append(dialog);
    dialog.showModal();
  });
}

// A field with its label (and hint) tied together for assistive technology.
let fieldIds = 0;
export function field(label, control, hint) {
  fieldIds += 1;
  const id = control.id || `field-${fieldIds}`;
  control.id = id;
  const hintId = hint ? `${id}-hint` : null;
  if (hintId) control.setAttribute("aria-describedby", hintId);
  return h(
    "div",
    { class: "field" },
    h("label", { for: id }, label),
    control,
    hint ? h("p", { class: "hint", id: hintId }, hint) : null,
  );
}

export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

// Reads whose answers may arrive out of order (the browser spreads requests over several
// connections): `start()` before each read returns `current()`, false once a newer read started
// or `supersede()` was called (by a save), so an older answer never draws over a newer view.
export function readSequence() {
  let newest = 0;
  return {
    start() {
      const ticket = ++newest;
      return () => ticket === newest;
    },
    supersede() {
      newest += 1;
    },
  };
}

// At most one call per `ms`, the last one always made: for re-fetches that live events trigger.
export function throttle(fn, ms) {
  let last = 0;
  let timer = null;
  return () => {
    const wait = last + ms - Date.now();
    clearTimeout(timer);
    if (wait <= 0) {
      last = Date.now();
      fn();
    } else {
      timer = setTimeout(() => {
        last = Date.now();
        fn();
      }, wait);
    }
  };
}
