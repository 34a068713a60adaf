/* edge-fleet console: live parts, plots, the command runner and uploads. Plain JavaScript, no build step.
 *
 * Live parts: an element with data-part="NAME" and data-src="/ui/..." is refetched (its inner HTML
 * replaced) when the page's event stream (<body data-live>) sends "event: NAME". Everything works
 * without this file except plots, uploads with progress and live refresh. */
(() => {
  "use strict";
  const api = (window.edgeConsole = { plots: {}, refreshed: {}, stream: null });
  const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  // A live part answered 401 (session ended elsewhere): to the login page, back here afterwards. Not while
  // a form is being submitted (logout): its own answer decides where the browser goes.
  let leaving = false;
  document.addEventListener("submit", (event) => { if (!event.defaultPrevented) leaving = true; });
  window.addEventListener("pageshow", () => { leaving = false; });  // back to this page from the history
  const toLogin = () => {
    if (!leaving) location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
  };

  // -- live parts -------------------------------------------------------------------------------------------
  const running = new WeakMap();
  async function refresh(el) {
    const state = running.get(el) || { busy: false, again: false };
    running.set(el, state);
    if (state.busy) { state.again = true; return; }
    state.busy = true;
    try {
      const response = await fetch(el.dataset.src, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (response.status === 401) { toLogin(); return; }
      if (response.ok) {
        el.innerHTML = await response.text();
        const part = el.dataset.part;
        api.refreshed[part] = (api.refreshed[part] || 0) + 1;
        el.dispatchEvent(new CustomEvent("console:refreshed", { bubbles: true }));
      }
    } catch (_) { /* a network blip: the next event tries again */ }
    finally {
      state.busy = false;
      if (state.again) { state.again = false; refresh(el); }
    }
  }
  const listeners = {};
  const on = (part, fn) => { (listeners[part] = listeners[part] || []).push(fn); };
  function changed(part) {
    document.querySelectorAll("[data-part]").forEach((el) => {
      if (el.dataset.part.split(" ").includes(part)) refresh(el);
    });
    (listeners[part] || []).forEach((fn) => fn());
  }
  function live() {
    const url = document.body.dataset.live;
    if (!url) return;
    const parts = new Set(Object.keys(listeners));
    document.querySelectorAll("[data-part]").forEach((el) => el.dataset.part.split(" ").forEach((p) => parts.add(p)));
    if (!window.EventSource) { setInterval(() => parts.forEach(changed), 5000); return; }
    const stream = new EventSource(url);
    parts.forEach((part) => stream.addEventListener(part, () => changed(part)));
    stream.onerror = () => { if (stream.readyState === EventSource.CLOSED) setTimeout(live, 5000); };
    api.stream = stream;
  }

  // -- plots (uPlot) ------------------------------------------------------------------------------------------
  const COLOURS = ["#1f5fbf", "#c62828", "#1a7f37", "#9a6700", "#6b3fa0", "#00838f"];
  function chart(id, data, series, unit) {
    const box = document.getElementById(id);
    if (!box) return;
    const points = data[0].length;
    const hasData = data.slice(1).some((col) => col.some((v) => v !== null));
    if (!hasData) {
      if (api.plots[id]) { api.plots[id].destroy(); delete api.plots[id]; }
      box.innerHTML = '<p class="empty">no data in this range</p>';
      box.dataset.points = "0";
      return;
    }
    const existing = api.plots[id];
    if (existing && existing.series.length === series.length + 1) {
      existing.setData(data);
    } else {
      if (existing) existing.destroy();
      box.innerHTML = "";
      const opts = {
        width: Math.max(box.clientWidth, 260), height: 170,
        series: [{}, ...series.map((s, i) => ({ label: s, stroke: COLOURS[i % COLOURS.length], width: 1.5,
          value: (u, v) => (v == null ? "–" : v.toFixed(v < 10 ? 2 : 1) + " " + unit) }))],
        axes: [{}, { size: 52 }], legend: { live: true }, cursor: { drag: { x: true, y: false } },
      };
      api.plots[id] = new window.uPlot(opts, data, box);
    }
    box.dataset.points = String(points);
  }
  function plots() {
    const box = document.getElementById("plots");
    if (!box || !window.uPlot) return;
    let range = box.dataset.range;
    async function load() {
      const response = await fetch(box.dataset.series + "?range=" + encodeURIComponent(range), { credentials: "same-origin" });
      if (response.status === 401) { toLogin(); return; }
      if (!response.ok) return;
      const s = await response.json();
      api.series = s;
      for (const m of s.labels) chart("plot-" + m.key, [s.x, s.metrics[m.key]], [m.label], m.unit);
      const names = Object.keys(s.models).sort();
      chart("plot-requests", [s.x, ...names.map((n) => s.models[n].rate)], names, "req/s");
      const latency = document.getElementById("plot-latency");
      if (s.latency) {
        chart("plot-latency", [s.x, ...names.flatMap((n) => [s.models[n].p50, s.models[n].p99])],
          names.flatMap((n) => [n + " p50", n + " p99"]), "ms");
      } else if (latency) {
        latency.innerHTML = '<p class="empty">this device does not report per-model latency</p>';
      }
      box.dataset.loaded = String((Number(box.dataset.loaded) || 0) + 1);
    }
    document.querySelectorAll("[data-range]").forEach((a) => {
      if (a.tagName !== "A") return;
      a.addEventListener("click", (event) => {
        event.preventDefault();
        range = a.dataset.range;
        document.querySelectorAll("a[data-range]").forEach((x) => x.removeAttribute("aria-current"));
        a.setAttribute("aria-current", "true");
        history.replaceState(null, "", "?range=" + encodeURIComponent(range));
        load();
      });
    });
    window.addEventListener("resize", () => {
      Object.entries(api.plots).forEach(([id, u]) => {
        const el = document.getElementById(id);
        if (el) u.setSize({ width: Math.max(el.clientWidth, 260), height: 170 });
      });
    });
    on("telemetry", load);
    load();
  }

  // -- rollout page: the head is replaced, device rows are patched in place (1,000 rows stay cheap) ---------------
  function ago(ts) {
    if (!ts) return "\u2013";
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s >= 86400) return Math.floor(s / 86400) + " d ago";
    if (s >= 3600) return Math.floor(s / 3600) + " h ago";
    if (s >= 60) return Math.floor(s / 60) + " min ago";
    return Math.floor(s) + " s ago";
  }
  function rollout() {
    const box = document.getElementById("rollout");
    if (!box) return;
    const rows = new Map();
    box.querySelectorAll("tr[data-device]").forEach((tr) => rows.set(tr.dataset.device, tr));
    let busy = false, again = false;
    async function load() {
      if (busy) { again = true; return; }
      busy = true;
      try {
        const response = await fetch(box.dataset.rollout, { credentials: "same-origin" });
        if (response.status === 401) { toLogin(); return; }
        if (!response.ok) return;
        const body = await response.json();
        document.getElementById("rollout-head-box").innerHTML = body.head;
        for (const [id, state, code, message, ts] of body.devices) {
          const tr = rows.get(id);
          if (!tr) continue;
          const cells = tr.cells;
          if (tr.dataset.state !== state) {
            tr.dataset.state = state;
            const chip = cells[1].firstElementChild;
            chip.className = "state state-" + state;
            chip.textContent = state;
          }
          const error = cells[2];
          if ((error.dataset.code || "") !== (code || "") || (error.dataset.message || "") !== (message || "")) {
            error.dataset.code = code || "";
            error.dataset.message = message || "";
            error.textContent = "";
            if (code || message) {
              const c = document.createElement("code");
              c.className = "error-code";
              c.textContent = code || "";
              const m = document.createElement("span");
              m.className = "muted";
              m.textContent = " " + (message || "").slice(0, 120);
              error.append(c, m);
            }
          }
          cells[3].dataset.ts = ts || "";
          cells[3].textContent = ago(ts);
        }
        box.querySelectorAll("section[data-wave]").forEach((section) => {
          section.classList.toggle("current", body.status === "running" && Number(section.dataset.wave) === body.current_wave + 1);
        });
        api.refreshed.rollout = (api.refreshed.rollout || 0) + 1;
      } catch (_) { /* the next event tries again */ }
      finally {
        busy = false;
        if (again) { again = false; load(); }
      }
    }
    on("rollout", load);
  }

  // -- command runner -------------------------------------------------------------------------------------------
  function commands() {
    const form = document.getElementById("command-form");
    if (!form) return;
    const out = document.getElementById("command-output");
    const select = document.getElementById("command-name");
    const args = document.getElementById("command-args");
    const examples = JSON.parse(select.dataset.examples || "{}");
    select.addEventListener("change", () => { args.value = JSON.stringify(examples[select.value] || {}); });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = form.querySelector("button");
      button.disabled = true;
      out.hidden = false;
      out.dataset.state = "running";
      out.textContent = select.value + ": waiting for the device…";
      try {
        const response = await fetch(form.action, { method: "POST", credentials: "same-origin",
          headers: { Accept: "application/json", "X-CSRF-Token": csrf() }, body: new URLSearchParams(new FormData(form)) });
        if (response.status === 401) { toLogin(); return; }
        const body = await response.json();
        if (body.error) {
          out.dataset.state = "error";
          out.textContent = body.error.code + ": " + body.error.message;
        } else {
          out.dataset.state = body.ok ? "ok" : "failed";
          out.textContent = body.name + " → " + (body.ok ? "ok" : "failed") + "\n" + JSON.stringify(body.response, null, 2);
        }
      } catch (err) {
        out.dataset.state = "error";
        out.textContent = "no answer: " + err;
      } finally {
        button.disabled = false;
        changed("events");
      }
    });
  }

  // -- upload with progress ---------------------------------------------------------------------------------------
  function upload() {
    const form = document.getElementById("upload-form");
    if (!form) return;
    const bar = document.getElementById("upload-progress");
    const result = document.getElementById("upload-result");
    const button = document.getElementById("upload-button");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      form.querySelectorAll("[data-error-for]").forEach((el) => { el.textContent = ""; });
      result.textContent = "";
      const xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      xhr.setRequestHeader("X-CSRF-Token", csrf());
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = Math.round((100 * e.loaded) / e.total); };
      xhr.upload.onload = () => { bar.removeAttribute("value"); result.textContent = "Checking the model and signing…"; };
      xhr.onload = () => {
        button.disabled = false;
        bar.hidden = true;
        let body = {};
        try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
        if (xhr.status === 201) {
          form.dataset.state = "published";
          result.innerHTML = "";
          const p = document.createElement("p");
          p.id = "upload-published";
          p.textContent = `Published ${body.name}@${body.version} (${body.runtime}, ${body.length} bytes, ` +
            `${body.test_vectors} test vector${body.test_vectors === 1 ? "" : "s"}). `;
          const a = document.createElement("a");
          a.href = "/deployments/new?model=" + encodeURIComponent(body.name + "@" + body.version);
          a.textContent = "Deploy it";
          p.appendChild(a);
          result.appendChild(p);
          changed("catalogue");
          return;
        }
        if (xhr.status === 401) { toLogin(); return; }
        form.dataset.state = "error";
        const error = body.error || { message: "upload failed (HTTP " + xhr.status + ")" };
        // an upload refused without a field (not a model, unsafe archive, ...) is about the file
        const where = error.field || (xhr.status >= 500 || xhr.status === 403 ? "form" : "file");
        const slot = form.querySelector(`[data-error-for="${where}"]`) ||
          form.querySelector('[data-error-for="form"]');
        slot.textContent = error.message + (error.code ? ` (${error.code})` : "");
        result.textContent = "";
      };
      xhr.onerror = () => { button.disabled = false; bar.hidden = true; form.dataset.state = "error";
        form.querySelector('[data-error-for="form"]').textContent = "the upload was interrupted"; };
      bar.hidden = false;
      bar.value = 0;
      button.disabled = true;
      form.dataset.state = "uploading";
      // optional fields left empty are left out (a browser sends an empty file input as an empty part)
      const body = new FormData(form);
      for (const [key, value] of [...body.entries()]) {
        if ((value instanceof File && !value.name && !value.size) || value === "") body.delete(key);
      }
      xhr.send(body);
    });
  }

  // -- login: a token in the link's fragment (#token=...) fills the field; the person still submits -----------------
  function login() {
    const field = document.getElementById("token");
    const match = location.hash.match(/^#token=([^&]+)/);
    if (field && match) {
      field.value = decodeURIComponent(match[1]);
      history.replaceState(null, "", location.pathname + location.search);
    }
  }

  window.addEventListener("hashchange", login);
  document.addEventListener("DOMContentLoaded", () => {
    login();
    plots();
    rollout();
    commands();
    upload();
    live();
  });
})();
