// Bundles: upload with a progress bar, the list, and one bundle's manifest and signature.

import { api, upload } from "../api.js";
import {
  add,
  ago,
  badge,
  clear,
  confirmDialog,
  empty,
  errorState,
  field,
  formatBytes,
  h,
  notify,
  readSequence,
  when,
} from "../dom.js";

function signature(b) {
  if (b.quarantined)
    return h("span", {}, badge("quarantined"), " — its bytes no longer match: devices are refused it.");
  if (b.signed_by)
    return h(
      "span",
      {},
      h("span", { class: "badge tone-good" }, "signed"),
      ` signed by ${b.signed_by}, verified at upload`,
    );
  return h("span", {}, badge("unknown"), " not signed");
}

function uploadForm(onDone) {
  const file = h("input", { type: "file", name: "file", accept: ".tar.gz,.tgz,application/gzip", required: true });
  const sig = h("textarea", {
    name: "signature",
    rows: 2,
    spellcheck: "false",
    placeholder: "optional: a JWS from `kernex bundle sign`",
  });
  const bar = h("progress", { max: 100, value: 0, "aria-label": "Upload progress" });
  const status = h("p", { class: "muted", role: "status", "aria-live": "polite" });
  const error = h("p", { class: "form-error", role: "alert" });
  const button = h("button", { type: "submit" }, "Upload");
  bar.hidden = true;
  return h(
    "form",
    {
      class: "card upload",
      onsubmit: async (event) => {
        event.preventDefault();
        const chosen = file.files[0];
        if (!chosen) return;
        error.textContent = "";
        button.disabled = true;
        bar.hidden = false;
        bar.value = 0;
        const form = new FormData();
        // The API reads the signature before the file (it streams the file to the store).
        if (sig.value.trim()) form.append("signature", sig.value.trim());
        form.append("file", chosen);
        try {
          const bundle = await upload("/api/v1/bundles", form, (sent, total) => {
            bar.value = Math.round((100 * sent) / total);
            status.textContent = `Uploading ${formatBytes(sent)} of ${formatBytes(total)} (${bar.value}%)`;
          });
          status.textContent = `Uploaded ${bundle.name} ${bundle.version}.`;
          notify(`Bundle ${bundle.name} ${bundle.version} uploaded and signed.`);
          file.value = "";
          sig.value = "";
          onDone(bundle);
        } catch (failure) {
          status.textContent = "";
          error.textContent = `${failure.message}${failure.status === 422 ? " Build bundles with `kernex bundle build <dir>`." : ""}`;
        } finally {
          button.disabled = false;
        }
      },
    },
    h("h2", {}, "Upload a bundle"),
    field(
      "Bundle file (.tar.gz)",
      file,
      "Built with `kernex bundle build`; the manifest is checked and the bundle signed with the release key.",
    ),
    field("Offline signature", sig),
    h("div", { class: "actions" }, button),
    bar,
    status,
    error,
  );
}

export async function renderList(ctx) {
  const { main } = ctx;
  const list = h("div", { class: "table-wrap" });
  add(main, h("h1", {}, "Bundles"));
  if (ctx.can("operator"))
    add(
      main,
      uploadForm(() => load()),
    );
  add(main, h("section", { "aria-label": "Bundles" }, list));

  // A live re-read sent before an upload finished must not hide the new bundle again.
  const reads = readSequence();
  async function load() {
    const latest = reads.start();
    try {
      const page = await api("GET", "/api/v1/bundles", { params: { limit: 200 } });
      if (ctx.stale() || !latest()) return;
      if (!page.items.length) {
        clear(
          list,
          empty(
            "No bundles yet.",
            ctx.can("operator")
              ? "Upload one above: build it with `kernex bundle build <dir>`."
              : "An operator uploads bundles; ask one, or sign in with an operator account.",
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
              ["Bundle", "Size", "Signature", "Uploaded"].map((c) => h("th", { scope: "col" }, c)),
            ),
          ),
          h(
            "tbody",
            {},
            page.items.map((b) =>
              h(
                "tr",
                { dataset: { bundle: b.id } },
                h(
                  "th",
                  { scope: "row", "data-label": "Bundle" },
                  h("a", { href: `#/bundles/${b.id}` }, `${b.name} ${b.version}`),
                ),
                h("td", { "data-label": "Size" }, formatBytes(b.size)),
                h(
                  "td",
                  { "data-label": "Signature" },
                  b.quarantined
                    ? badge("quarantined")
                    : b.signed_by
                      ? h("span", {}, h("span", { class: "badge tone-good" }, "signed"), ` ${b.signed_by}`)
                      : badge("unknown"),
                ),
                h("td", { "data-label": "Uploaded" }, ago(b.created_at), b.created_by ? ` by ${b.created_by}` : ""),
              ),
            ),
          ),
        ),
      );
    } catch (error) {
      if (!ctx.stale() && latest()) clear(list, errorState(error, load));
    }
  }
  ctx.on("refresh", load);
  await load();
}

export async function renderDetail(ctx) {
  const { main } = ctx;
  const id = ctx.args[0];
  let b;
  try {
    b = await api("GET", `/api/v1/bundles/${encodeURIComponent(id)}`);
  } catch (error) {
    add(
      main,
      h("h1", {}, "Bundle"),
      errorState(error, () => location.reload()),
    );
    return;
  }
  if (ctx.stale()) return;
  const m = b.manifest || {};
  const files = Array.isArray(m.files) ? m.files : [];
  const actions = h("div", { class: "actions" });
  if (ctx.can("operator") && !b.quarantined) {
    add(actions, h("a", { class: "button", href: `#/deployments/new?bundle=${b.id}` }, "Deploy this bundle"));
    add(
      actions,
      h(
        "button",
        {
          type: "button",
          class: "danger",
          onclick: async () => {
            if (
              !(await confirmDialog(
                "Delete this bundle?",
                `${b.name} ${b.version} will be removed from the bundle store.`,
                "Delete",
              ))
            )
              return;
            try {
              await api("DELETE", `/api/v1/bundles/${b.id}`);
              notify("Bundle deleted.");
              location.hash = "#/bundles";
            } catch (error) {
              notify(error.status === 409 ? `Not deleted: ${error.message}` : error.message, "bad");
            }
          },
        },
        "Delete",
      ),
    );
  }
  add(
    main,
    h("p", { class: "crumbs" }, h("a", { href: "#/bundles" }, "Bundles"), " / "),
    h("h1", {}, `${b.name} ${b.version}`),
    actions,
    h(
      "section",
      { class: "card" },
      h(
        "dl",
        { class: "facts" },
        fact("Signature", signature(b)),
        fact("SHA-256", h("span", { class: "mono break" }, b.sha256)),
        fact("Size", formatBytes(b.size)),
        fact("Uploaded", when(b.created_at), b.created_by ? ` by ${b.created_by}` : ""),
        fact("Description", m.description || "—"),
        fact("Device types", Array.isArray(m.device_types) ? m.device_types.join(", ") : "—"),
        fact("Install script", script(m.install)),
        fact("Rollback script", script(m.rollback)),
        fact("Health check", script(m.health_check)),
      ),
    ),
    h(
      "section",
      { class: "card", "aria-labelledby": "files-h" },
      h("h2", { id: "files-h" }, `Files (${files.length})`),
      files.length
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
                  h("th", { scope: "col" }, "Path"),
                  h("th", { scope: "col" }, "Size"),
                  h("th", { scope: "col" }, "SHA-256"),
                ),
              ),
              h(
                "tbody",
                {},
                files.map((f) =>
                  h(
                    "tr",
                    {},
                    h("td", { "data-label": "Path", class: "mono" }, f.path, f.executable ? " (executable)" : ""),
                    h("td", { "data-label": "Size" }, formatBytes(f.size)),
                    h("td", { "data-label": "SHA-256", class: "mono small break" }, f.sha256 || "—"),
                  ),
                ),
              ),
            ),
          )
        : empty("The manifest lists no files."),
    ),
    h(
      "section",
      { class: "card", "aria-labelledby": "manifest-h" },
      h("h2", { id: "manifest-h" }, "Manifest"),
      h("pre", { class: "code", tabindex: "0" }, JSON.stringify(m, null, 2)),
    ),
  );
}

function script(s) {
  return s && s.path ? `${s.path} (timeout ${s.timeout_s} s)` : "—";
}

function fact(label, ...value) {
  return h("div", { class: "fact" }, h("dt", {}, label), h("dd", {}, ...value));
}
