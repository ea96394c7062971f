// The REST client: bearer token, JSON, one error type, uploads with progress.
//
// The access token lives in sessionStorage: it survives a reload of this tab and is gone when
// the tab closes; it is never put in a cookie, so there is nothing for another site to ride on
// (no CSRF), and the page's CSP allows no script but our own to read it.

const TOKEN_KEY = "kernex.session";

export class ApiError extends Error {
  constructor(status, code, message, requestId, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.requestId = requestId;
    this.retryAfter = retryAfter;
  }
}

export function session() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(TOKEN_KEY) || "null");
    if (saved && Date.parse(saved.expiresAt) > Date.now()) return saved;
  } catch {
    // A damaged entry is the same as none.
  }
  return null;
}

export function saveSession(token, expiresAt) {
  sessionStorage.setItem(TOKEN_KEY, JSON.stringify({ token, expiresAt }));
}

export function clearSession() {
  sessionStorage.removeItem(TOKEN_KEY);
}

// Anything that ends the session (a 401 from any call) tells the app once, which shows the login.
function unauthorized(message) {
  clearSession();
  window.dispatchEvent(new CustomEvent("kernex:unauthorized", { detail: message }));
}

export function authHeader() {
  const current = session();
  return current ? { Authorization: `Bearer ${current.token}` } : {};
}

function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params || {})) {
    if (value !== undefined && value !== null && value !== "") search.set(key, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

async function toError(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's error page): the status says enough.
  }
  const detail = body && body.error ? body.error : {};
  const retryAfter = Number(response.headers.get("Retry-After")) || null;
  let message = detail.message || `${response.status} ${response.statusText}`;
  if (response.status === 429) {
    message = `Too many requests: wait ${retryAfter || "a few"} seconds and try again.`;
  } else if (response.status === 503) {
    message = `The server cannot reach a service it needs (${detail.message || "database or broker"}). Try again shortly.`;
  }
  return new ApiError(response.status, detail.code || "error", message, detail.request_id, retryAfter);
}

// api("GET", "/api/v1/devices", { query: {status: "online"} }) -> parsed JSON (null for 204).
export async function api(method, path, { body, params, auth = true } = {}) {
  const headers = { Accept: "application/json", ...(auth ? authHeader() : {}) };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path + query(params), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch {
    throw new ApiError(
      0,
      "network",
      "Cannot reach the Kernex server. Check your connection; the page retries on its own.",
    );
  }
  if (response.status === 401 && auth) {
    const error = await toError(response);
    unauthorized("Your session has ended. Sign in again.");
    throw error;
  }
  if (!response.ok) throw await toError(response);
  if (response.status === 204) return null;
  return response.json();
}

// A multipart upload through XMLHttpRequest, the one browser API that reports upload progress.
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [key, value] of Object.entries(authHeader())) xhr.setRequestHeader(key, value);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded, event.total);
    });
    xhr.addEventListener("load", async () => {
      const response = new Response(xhr.responseText || null, {
        status: xhr.status,
        statusText: xhr.statusText,
        headers: { "Retry-After": xhr.getResponseHeader("Retry-After") || "" },
      });
      if (xhr.status === 401) unauthorized("Your session has ended. Sign in again.");
      if (xhr.status >= 200 && xhr.status < 300) resolve(await response.json());
      else reject(await toError(response));
    });
    xhr.addEventListener("error", () =>
      reject(new ApiError(0, "network", "The upload was interrupted: check your connection and upload again.")),
    );
    xhr.send(form);
  });
}
