// The live feed: GET /api/v1/events/stream read with fetch(), reconnecting after any blip.
//
// fetch() rather than EventSource because EventSource cannot send an Authorization header, and a
// token in the URL would end up in proxy and access logs. The parser below follows the SSE
// format (event/data/id fields, blank line ends an event, ":" starts a comment).
//
// Correctness after a blip: every reconnect sends the last event id. The server replays what
// was missed ("hello" with resumed: true) or, when it cannot, says resumed: false, and we tell
// the page to re-fetch ("refresh"). Either way the view ends up equal to the server's state.

import { authHeader } from "./api.js";

const STREAM_PATH = "/api/v1/events/stream";
const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 30000;
// The server sends at least a keepalive every 15 s; twice that in silence means a dead link
// (a laptop that slept, a proxy that dropped us without closing).
const SILENCE_MS = 35000;

export class Live {
  constructor(onUnauthorized) {
    this.onUnauthorized = onUnauthorized;
    this.listeners = new Map();
    this.lastId = null;
    this.state = "connecting";
    this.running = false;
    this.controller = null;
    this.wake = null;
    // The browser knows when the network went away: say so at once instead of waiting for the
    // silence watchdog, and come back as soon as it returns instead of after the backoff.
    window.addEventListener("offline", () => this.controller && this.controller.abort());
    window.addEventListener("online", () => this.reconnectNow());
  }

  // on("devices", fn) -> a function that removes the listener.
  on(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(fn);
    return () => this.listeners.get(type).delete(fn);
  }

  emit(type, data) {
    for (const fn of [...(this.listeners.get(type) || [])]) {
      try {
        fn(data);
      } catch (error) {
        console.error("live listener failed", type, error);
      }
    }
  }

  setState(state) {
    if (state !== this.state) {
      this.state = state;
      this.emit("connection", state);
    }
  }

  start() {
    if (this.running) return;
    this.running = true;
    this.loop();
  }

  stop() {
    this.running = false;
    this.lastId = null;
    if (this.controller) this.controller.abort();
  }

  reconnectNow() {
    if (this.wake) this.wake();
    else if (this.controller) this.controller.abort();
  }

  sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.wake = done;
    }).finally(() => {
      this.wake = null;
    });
  }

  async loop() {
    let backoff = BACKOFF_MIN_MS;
    while (this.running) {
      let outcome;
      try {
        outcome = await this.connect();
      } catch {
        outcome = "error";
      }
      if (!this.running) break;
      if (outcome === "unauthorized") {
        this.running = false;
        this.onUnauthorized();
        break;
      }
      if (outcome === "ended") {
        // The server closes each stream after a minute (to authenticate us again): not a blip.
        backoff = BACKOFF_MIN_MS;
        continue;
      }
      this.setState("reconnecting");
      // Jitter spreads the reconnects of many dashboards after a server restart.
      await this.sleep(backoff * (0.5 + Math.random() / 2));
      backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    }
  }

  async connect() {
    this.controller = new AbortController();
    const headers = { Accept: "text/event-stream", ...authHeader() };
    if (this.lastId) headers["Last-Event-ID"] = this.lastId;
    const response = await fetch(STREAM_PATH, { headers, signal: this.controller.signal, cache: "no-store" });
    if (response.status === 401) return "unauthorized";
    if (!response.ok || !response.body) return "error";
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let watchdog = setTimeout(() => this.controller.abort(), SILENCE_MS);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return "ended";
        clearTimeout(watchdog);
        watchdog = setTimeout(() => this.controller.abort(), SILENCE_MS);
        buffer += value;
        let end;
        // Events end with a blank line; a partial event waits for the next chunk.
        while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
          this.dispatch(block);
        }
      }
    } finally {
      clearTimeout(watchdog);
    }
  }

  dispatch(block) {
    let type = "message";
    let data = "";
    let id = null;
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") type = value;
      else if (field === "data") data += (data ? "\n" : "") + value;
      else if (field === "id") id = value;
    }
    if (!data) return;
    const payload = JSON.parse(data);
    if (type === "hello") {
      this.setState("live");
      if (!payload.resumed) this.emit("refresh", { reason: "connected" });
    } else if (type === "resync") {
      this.emit("refresh", payload);
    } else {
      this.emit(type, payload);
    }
    // Only after the event was applied: a break before this replays it, which is harmless.
    if (id !== null) this.lastId = id;
  }
}
