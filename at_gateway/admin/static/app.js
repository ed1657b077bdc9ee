/* at-gateway dashboard: one page, hash routes (#/overview, #/keys, ...), no library, no build step.
 *
 * Everything it shows comes from the admin API (api/v1/...): the page holds no logic the API lacks. Every URL
 * is relative to the page ({base_path}/admin/), so it works under any base_path. The Content-Security-Policy
 * allows no inline script or style, so the DOM is built with createElement (never innerHTML: API values are
 * text, never markup) and styles come from app.css alone.
 *
 * Sign-in: POST login {token} sets an HttpOnly session cookie and a readable atg_csrf cookie; every write sends
 * the latter back as X-CSRF-Token. The page never keeps the token itself.
 */
"use strict";

(() => {
  const API = "api/v1/";
  const POLL_MS = 1000;
  const LIMITS = ["rpm", "rph", "rpd", "tpm", "tpd"];
  const LIMIT_NAMES = {
    rpm: "requests / minute", rph: "requests / hour", rpd: "requests / day",
    tpm: "tokens / minute", tpd: "tokens / day",
  };
  const BUDGET_PERIODS = ["month", "week", "day"];
  const PROVIDER_TYPES = ["openai", "azure", "anthropic", "gemini", "vertex", "echo"];
  // Fields of a provider or route read that a write ignores (admin/catalog.py READ_ONLY): left out of editors.
  const READ_ONLY = ["object", "source", "overrides_config", "created_at", "updated_at", "credentials_encrypted"];
  const SVGNS = "http://www.w3.org/2000/svg";

  // -- DOM ---------------------------------------------------------------------------------------------
  const PROPS = new Set(["value", "checked", "disabled", "hidden", "selected", "readOnly", "required", "open"]);

  function props(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.setAttribute("class", v);
      else if (k === "text") el.textContent = String(v);
      else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(el.dataset, v);
      else if (PROPS.has(k)) el[k] = v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
  }

  function add(el, kids) {
    for (const kid of kids) {
      if (kid === null || kid === undefined || kid === false) continue;
      if (Array.isArray(kid)) add(el, kid);
      else el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }

  /** An HTML element: h("a", {href: "#/keys", class: "x"}, "text", child, [more]). */
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    props(el, attrs);
    return add(el, kids);
  }

  /** An SVG element (attributes only). */
  function s(tag, attrs, ...kids) {
    const el = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) el.setAttribute(k, String(v));
    }
    return add(el, kids);
  }

  const $ = (sel, root = document) => root.querySelector(sel);
  let uid = 0;
  const newId = (prefix) => `${prefix}-${++uid}`;

  function announce(text) {
    const box = $("#status");
    box.textContent = "";
    box.textContent = text;
  }

  // -- formatting --------------------------------------------------------------------------------------
  const intFmt = new Intl.NumberFormat("en");

  function num(v) {
    if (v === null || v === undefined || v === "") return null;
    const n = Number(v);
    return Number.isFinite(n) ? n : null;
  }

  function fmtInt(v) {
    const n = num(v);
    return n === null ? "–" : intFmt.format(Math.round(n));
  }

  function fmtShort(v) {
    const n = num(v);
    if (n === null) return "–";
    const a = Math.abs(n);
    if (a >= 1e9) return `${+(n / 1e9).toFixed(1)}G`;
    if (a >= 1e6) return `${+(n / 1e6).toFixed(1)}M`;
    if (a >= 1e4) return `${+(n / 1e3).toFixed(1)}k`;
    if (a >= 100 || Number.isInteger(n)) return intFmt.format(Math.round(n));
    return String(+n.toFixed(a >= 10 ? 1 : 2));
  }

  function fmtMs(v) {
    const n = num(v);
    if (n === null) return "–";
    if (n < 1000) return `${n < 10 ? +n.toFixed(1) : Math.round(n)} ms`;
    return `${+(n / 1000).toFixed(n < 10000 ? 2 : 1)} s`;
  }

  function trimUsd(text) {
    const [whole, frac = ""] = text.split(".");
    return `$${whole}.${frac.replace(/0+$/, "").padEnd(2, "0")}`;
  }

  /** USD: exact decimal strings from the API as they are (trailing zeros off, at least cents), numbers rounded. */
  function fmtUsd(v) {
    if (typeof v === "string" && /^\d+(\.\d+)?$/.test(v)) return trimUsd(v);
    const n = num(v);
    if (n === null) return "–";
    if (Math.abs(n) >= 1) return `$${n.toFixed(2)}`;
    if (Math.abs(n) >= 0.01) return trimUsd(n.toFixed(4));
    return trimUsd(Number(n.toPrecision(3)).toFixed(9));
  }

  function fmtPct(v) {
    const n = num(v);
    return n === null ? "–" : `${n < 10 ? +n.toFixed(1) : Math.round(n)} %`;
  }

  function toDate(v) {
    if (v === null || v === undefined || v === "") return null;
    const d = typeof v === "number" ? new Date(v * 1000) : new Date(v);
    return Number.isNaN(d.getTime()) ? null : d;
  }

  const pad2 = (n) => String(n).padStart(2, "0");

  /** Local time as 24-hour HH:MM:SS (the API's times are UTC; people read their own clock). */
  function fmtTime(v) {
    const d = toDate(v);
    return d ? `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}` : (v ? String(v) : "–");
  }

  /** Local date and time as YYYY-MM-DD HH:MM:SS. */
  function fmtDateTime(v) {
    const d = toDate(v);
    if (!d) return v ? String(v) : "–";
    return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${fmtTime(d.getTime() / 1000)}`;
  }

  function fmtAge(ms) {
    const n = num(ms);
    if (n === null) return "–";
    if (n < 1000) return `${Math.round(n)} ms`;
    if (n < 60000) return `${(n / 1000).toFixed(1)} s`;
    return `${Math.floor(n / 60000)} min ${Math.round((n % 60000) / 1000)} s`;
  }

  function statusBadge(status) {
    const n = num(status);
    const cls = n === null ? "" : n < 400 ? "ok" : n < 500 ? "warn" : "err";
    return h("span", {class: `badge ${cls}`}, n === null ? "–" : String(n));
  }

  function sourceBadge(item) {
    if (item.source === "database") {
      return h("span", {class: "badge db", title: item.overrides_config ? "stored in the database, replacing the " +
        "config file's entry of the same name" : "stored in the database"},
      item.overrides_config ? "database (overrides YAML)" : "database");
    }
    return h("span", {class: "badge", title: "from the config file: change the file and reload"}, "YAML");
  }

  // -- the admin API -----------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, error) {
      super((error && error.message) || `HTTP ${status}`);
      this.status = status;
      this.code = error && error.code;
      this.problems = (error && Array.isArray(error.problems)) ? error.problems : [];
    }
  }

  class Offline extends Error {}

  function cookie(name) {
    for (const part of document.cookie.split(";")) {
      const [k, ...rest] = part.trim().split("=");
      if (k === name) return decodeURIComponent(rest.join("="));
    }
    return null;
  }

  /** One call: JSON in and out; the CSRF header on every write; 401 ends the session (unless quiet). */
  async function api(method, path, body, opts = {}) {
    const headers = {Accept: "application/json"};
    const init = {method, headers, credentials: "same-origin", cache: "no-store"};
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    if (method !== "GET" && method !== "HEAD") {
      const csrf = cookie("atg_csrf");
      if (csrf) headers["X-CSRF-Token"] = csrf;
    }
    let res;
    try {
      res = await fetch(path.startsWith("api/") || opts.page ? path : API + path, init);
    } catch (exc) {
      setOffline(true);
      throw new Offline(String(exc && exc.message || exc));
    }
    setOffline(false);
    const text = res.status === 204 ? "" : await res.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (exc) { data = null; }
    }
    if (!res.ok) {
      const error = data && data.error ? data.error : {message: `${res.status} ${res.statusText}`};
      if (res.status === 401 && !opts.login) signedOut("Your session ended: log in again.");
      throw new ApiError(res.status, error);
    }
    return data;
  }

  function setOffline(on) {
    $("#offline").hidden = !on;
  }

  function errorBox(exc) {
    if (exc instanceof Offline) return h("div", {class: "alert", role: "alert"}, "Cannot reach the gateway.");
    const problems = exc instanceof ApiError ? exc.problems : [];
    return h("div", {class: "alert", role: "alert"},
      problems.length ? `${exc.status}: fix these and try again` : (exc instanceof ApiError ? `${exc.status}: ` : "") +
        String(exc.message || exc),
      problems.length ? h("ul", null, problems.map((p) => h("li", null, p))) : null);
  }

  function focusKey(el) {
    return `${el.tagName}|${el.getAttribute("href") || ""}|${el.getAttribute("aria-label") || el.textContent}`;
  }

  function rowKey(el) {
    const row = el.closest("tr");
    if (!row) return null;
    const attr = [...row.attributes].find((a) => a.name.startsWith("data-"));
    return attr ? `[${attr.name}="${CSS.escape(attr.value)}"]` : null;
  }

  /** Show `node` in `box` instead of what it shows, unless that is the same already (lists redrawn every second
   * stay still); the focused link or button keeps the focus (or one in its row): a keyboard user is not thrown out. */
  function swap(box, node) {
    if (box.childElementCount === 1 && box.firstElementChild.outerHTML === node.outerHTML) return;
    const active = document.activeElement;
    const inside = active && active !== document.body && box.contains(active);
    const key = inside ? focusKey(active) : null;
    const row = inside ? rowKey(active) : null;
    box.replaceChildren(node);
    if (!inside) return;
    const focusable = [...box.querySelectorAll("a[href], button:not([disabled]), input, select, textarea")];
    const again = focusable.find((e) => focusKey(e) === key) ||
      (row && box.querySelector(row) && [...box.querySelector(row).querySelectorAll(
        "a[href], button:not([disabled])")][0]);
    if (again) again.focus();
  }

  /** Show an error in `slot` (an element emptied first), or clear it (exc null). */
  function showError(slot, exc) {
    slot.replaceChildren(...(exc ? [errorBox(exc)] : []));
  }

  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) {
      if (v !== null && v !== undefined && v !== "") q.set(k, String(v));
    }
    const text = q.toString();
    return text ? `?${text}` : "";
  }

  // -- polling -----------------------------------------------------------------------------------------
  /** Run `fn` now and then every `ms` after it finished (never two at once); paused while the tab is hidden. */
  function poller(fn, ms = POLL_MS) {
    let timer = 0;
    let stopped = true;
    let running = false;
    let again = false;
    const tick = async () => {
      timer = 0;
      if (stopped) return;
      if (running) { again = true; return; }
      running = true;
      try {
        if (!document.hidden) await fn();
      } catch (exc) {
        // Shown where they belong (the offline banner, an error box); anything else is a bug: say so.
        if (!(exc instanceof Offline) && !(exc instanceof ApiError)) console.error(exc);
      } finally {
        running = false;
      }
      if (!stopped) timer = setTimeout(tick, again ? 0 : ms);
      again = false;
    };
    return {
      start() { if (stopped) { stopped = false; tick(); } },
      stop() { stopped = true; clearTimeout(timer); timer = 0; },
      now() { if (!stopped) { clearTimeout(timer); tick(); } },
    };
  }

  // -- dialogs -----------------------------------------------------------------------------------------
  /** A modal <dialog> (focus kept inside, Escape closes); removed from the page when closed. */
  function modal(title, ...body) {
    const titleId = newId("dlg");
    const opener = document.activeElement;
    const dlg = h("dialog", {"aria-labelledby": titleId}, h("h2", {id: titleId}, title), ...body);
    dlg.addEventListener("close", () => {
      dlg.remove();
      const back = opener && opener.isConnected ? opener : $("main h1");
      if (back && !document.querySelector("dialog[open]")) back.focus();
    });
    document.body.append(dlg);
    dlg.showModal();
    return dlg;
  }

  function confirmDialog(title, text, label, danger = true) {
    return new Promise((resolve) => {
      let answer = false;
      const ok = h("button", {type: "button", class: danger ? "btn danger" : "btn primary",
        onclick: () => { answer = true; dlg.close(); }}, label);
      const dlg = modal(title, h("p", null, text), h("div", {class: "actions"},
        h("button", {type: "button", class: "btn", onclick: () => dlg.close()}, "Cancel"), ok));
      dlg.addEventListener("close", () => resolve(answer));
      ok.focus();
    });
  }

  async function copyText(text, input) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch (exc) {
      input.focus();
      input.select();
      try { return document.execCommand("copy"); } catch (exc2) { return false; }
    }
  }

  /** The secret of a new or rotated key: shown this once, with a copy button. */
  function secretDialog(key, what) {
    const input = h("input", {type: "text", readOnly: true, value: key.key, id: "new-secret", "aria-label": "The key",
      spellcheck: "false", autocomplete: "off"});
    const said = h("span", {class: "small muted", role: "status"});
    const copy = h("button", {type: "button", class: "btn", id: "copy-secret", onclick: async () => {
      said.textContent = (await copyText(key.key, input)) ? "Copied." : "Select the key and copy it by hand.";
    }}, "Copy");
    const dlg = modal(what,
      h("p", null, "Key ", h("strong", null, key.name), " (", h("span", {class: "id"}, key.id), "). ",
        "This is the only time its secret is shown: copy it now. The gateway keeps only its hash."),
      h("div", {class: "secret"}, input, copy), said,
      h("p", {class: "small muted"}, "Clients send it as Authorization: Bearer KEY or X-Api-Key: KEY."),
      h("div", {class: "actions"}, h("button", {type: "button", class: "btn primary", onclick: () => dlg.close()},
        "Done")));
    input.focus();
    input.select();
    return new Promise((resolve) => dlg.addEventListener("close", resolve));
  }

  /** A JSON editor for a provider or route spec; `save(spec)` writes it (its errors are shown in the dialog). */
  function jsonDialog(title, spec, save, intro) {
    const area = h("textarea", {rows: 16, id: "spec-json", spellcheck: "false", "aria-label": `${title}: JSON`},
      JSON.stringify(spec, null, 2));
    const errors = h("div");
    const submit = h("button", {type: "submit", class: "btn primary"}, "Save");
    const form = h("form", {novalidate: true}, intro || null, h("div", {class: "field"}, area), errors,
      h("div", {class: "actions"}, h("button", {type: "button", class: "btn", onclick: () => dlg.close()}, "Cancel"),
        submit));
    const dlg = modal(title, form);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      let parsed;
      try {
        parsed = JSON.parse(area.value);
      } catch (exc) {
        showError(errors, new Error(`Not valid JSON: ${exc.message}`));
        return;
      }
      submit.disabled = true;
      try {
        await save(parsed);
        dlg.close();
      } catch (exc) {
        showError(errors, exc);
      } finally {
        submit.disabled = false;
      }
    });
    area.focus();
    return dlg;
  }

  function editable(item) {
    const out = {};
    for (const [k, v] of Object.entries(item)) if (!READ_ONLY.includes(k)) out[k] = v;
    return out;
  }

  // -- building blocks ---------------------------------------------------------------------------------
  function table(columns, rows, {empty = "Nothing yet.", rowAttrs, caption} = {}) {
    const head = h("tr", null, columns.map((c) => h("th", {class: c.num ? "num" : null, scope: "col"}, c.title)));
    const body = rows.length ? rows.map((r) => h("tr", rowAttrs ? rowAttrs(r) : null,
      columns.map((c) => h("td", {class: c.num ? "num" : null}, c.cell(r)))))
      : [h("tr", null, h("td", {colspan: columns.length, class: "empty"}, empty))];
    return h("div", {class: "table-wrap"}, h("table", null, caption ? h("caption", {class: "sr-only"}, caption) : null,
      h("thead", null, head), h("tbody", null, body)));
  }

  function field(labelText, control, hint) {
    const id = control.id || newId("f");
    control.id = id;
    return h("div", {class: "field"}, h("label", {for: id}, labelText), control,
      hint ? h("div", {class: "hint"}, hint) : null);
  }

  function heading(text, ...extra) {
    return h("div", {class: "panel-head"}, h("h1", {tabindex: "-1"}, text), ...extra);
  }

  function routeLink(kind, name, label) {
    if (name === null || name === undefined || name === "") return h("span", {class: "muted"}, "–");
    return h("a", {href: `#/requests${query({[kind]: name})}`, title: `requests with ${kind} ${name}`},
      String(label || name));
  }

  // -- charts: a small SVG line chart ------------------------------------------------------------------
  /** A round step (1, 2, 2.5, 5 times a power of ten) of at least `v`. */
  function niceStep(v) {
    if (!(v > 0)) return 0.25;
    const e = 10 ** Math.floor(Math.log10(v));
    const f = v / e;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * e;
  }

  function hhmm(t) {
    const d = new Date(t * 1000);
    return `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
  }

  /** A chart panel: `spec` {id, title, series: [{name, cls, value(point)}], fmt}; `.draw(series answer)`. */
  function chart(spec) {
    const plot = h("div", {class: "plot"});
    const legend = h("ul", {class: "legend"});
    const fig = h("figure", {class: "chart", id: `chart-${spec.id}`}, h("figcaption", null, spec.title), plot, legend);
    let last = null;

    function draw(answer) {
      if (answer) last = answer;
      if (!last || !fig.isConnected) return;
      const points = last.points || [];
      const from = num(last.from) ?? (points.length ? points[0].t : Date.now() / 1000 - 3600);
      const to = num(last.to) ?? (points.length ? points[points.length - 1].t + 60 : Date.now() / 1000);
      const W = Math.max(200, Math.floor(plot.clientWidth || 320));
      const H = 160;
      const pad = {l: 46, r: 8, t: 8, b: 20};
      // The last point is the current minute, still growing: drawn dashed; a rate divides by its seconds so far.
      const lastT = points.length ? num(points[points.length - 1].t) : null;
      const nowS = Date.now() / 1000;
      const seconds = (p) => (num(p.t) === lastT ? Math.min(60, Math.max(5, nowS - lastT)) : 60);
      const data = spec.series.map((sr) => points.map((p) => [num(p.t), num(sr.value(p, seconds(p)))]));
      let max = 0;
      for (const line of data) for (const [, v] of line) if (v !== null && v > max) max = v;
      const gridStep = niceStep(max / 4);
      const lines = Math.max(1, Math.ceil(max / gridStep - 1e-9));
      const top = gridStep * lines;
      const x = (t) => pad.l + ((t - from) / Math.max(1, to - from)) * (W - pad.l - pad.r);
      const y = (v) => pad.t + (1 - v / top) * (H - pad.t - pad.b);
      const kids = [];
      for (let i = 0; i <= lines; i++) {
        const v = gridStep * i;
        kids.push(s("line", {class: "grid", x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v)}));
        kids.push(s("text", {class: "axis", x: pad.l - 6, y: y(v) + 3, "text-anchor": "end"}, spec.axis(v)));
      }
      const step = (to - from) > 7200 ? 3600 : 900;
      for (let t = Math.ceil(from / step) * step; t <= to; t += step) {
        const px = x(t);
        const anchor = px > W - pad.r - 16 ? "end" : px < pad.l + 16 ? "start" : "middle";
        kids.push(s("text", {class: "axis", x: px, y: H - 5, "text-anchor": anchor}, hhmm(t)));
      }
      let any = false;
      data.forEach((line, i) => {
        const cls = spec.series[i].cls;
        let d = "";
        let run = [];
        const flush = () => {
          if (run.length === 1) kids.push(s("circle", {class: `dot ${cls}`, cx: run[0][0], cy: run[0][1], r: 2.5}));
          run = [];
        };
        let partial = null;
        line.forEach(([t, v], j) => {
          if (t === null || v === null) { flush(); return; }
          const px = x(t).toFixed(1);
          const py = y(v).toFixed(1);
          any = true;
          if (j === line.length - 1 && run.length) { // this minute so far: a dashed segment from the last one
            partial = `M${run[run.length - 1][0]} ${run[run.length - 1][1]}L${px} ${py}`;
            return;
          }
          d += `${run.length ? "L" : "M"}${px} ${py}`;
          run.push([px, py]);
        });
        if (partial === null || run.length > 1) flush();
        if (d && d.includes("L")) kids.push(s("path", {class: `line ${cls}`, d}));
        if (partial) kids.push(s("path", {class: `line partial ${cls}`, d: partial}));
      });
      if (!any) {
        kids.push(s("text", {class: "none", x: (pad.l + W - pad.r) / 2, y: H / 2, "text-anchor": "middle"},
          "no requests in the last hour"));
      }
      const latest = spec.series.map((sr, i) => { // the last whole minute's, else this one's so far
        const vals = data[i].slice(0, -1).filter(([, v]) => v !== null);
        const now = data[i].length ? data[i][data[i].length - 1][1] : null;
        return vals.length ? vals[vals.length - 1][1] : now;
      });
      const label = `${spec.title}, last hour per minute. Latest: ` +
        spec.series.map((sr, i) => `${sr.name} ${latest[i] === null ? "none" : spec.fmt(latest[i])}`).join(", ");
      plot.replaceChildren(s("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label},
        ...kids));
      legend.replaceChildren(...spec.series.map((sr, i) => h("li", null, h("span", {class: `sw ${sr.cls}`}),
        `${sr.name} `, h("b", null, latest[i] === null ? "–" : spec.fmt(latest[i])))));
    }

    return {el: fig, draw};
  }

  // -- views -------------------------------------------------------------------------------------------
  function overviewView() {
    const charts = [
      {id: "rps", title: "Requests per second", fmt: fmtShort, axis: fmtShort,
        series: [{name: "requests/s", cls: "s1", value: (p, seconds) => num(p.requests) / seconds}]},
      {id: "answers", title: "Answers per minute", fmt: fmtShort, axis: fmtShort,
        series: [{name: "ok", cls: "s5", value: (p) => num(p.requests) - num(p.errors)},
          {name: "errors", cls: "s3", value: (p) => p.errors}]},
      {id: "errors", title: "Error rate", fmt: fmtPct, axis: (v) => `${fmtShort(v)}%`,
        series: [{name: "errors", cls: "s3", value: (p) => (p.requests ? (100 * p.errors) / p.requests : null)}]},
      {id: "fallbacks", title: "Fallbacks per minute", fmt: fmtShort, axis: fmtShort,
        series: [{name: "fallbacks", cls: "s4", value: (p) => p.fallbacks}]},
      {id: "latency", title: "Latency", fmt: fmtMs, axis: fmtMs,
        series: [{name: "p50", cls: "s1", value: (p) => p.p50_ms}, {name: "p95", cls: "s2", value: (p) => p.p95_ms}]},
      {id: "ttft", title: "Time to first token", fmt: fmtMs, axis: fmtMs,
        series: [{name: "p50", cls: "s1", value: (p) => p.ttft_p50_ms},
          {name: "p95", cls: "s2", value: (p) => p.ttft_p95_ms}]},
      {id: "tokens", title: "Tokens per minute", fmt: fmtShort, axis: fmtShort,
        series: [{name: "prompt", cls: "s1", value: (p) => p.prompt_tokens},
          {name: "completion", cls: "s5", value: (p) => p.completion_tokens}]},
      {id: "cost", title: "Cost per minute", fmt: fmtUsd, axis: fmtUsd,
        series: [{name: "USD", cls: "s4", value: (p) => p.cost_usd}]},
    ].map(chart);

    const stat = (key, label) => h("div", {class: "card"}, h("span", {class: "label"}, label),
      h("span", {class: "value", "data-stat": key}, "–"));
    const cards = h("div", {class: "cards"}, stat("requests", "Requests, last hour"), stat("error_rate", "Error rate"),
      stat("fallbacks", "Fallbacks"), stat("p95", "p95 latency, last minute"), stat("in_flight", "In flight now"),
      stat("tokens", "Tokens, last hour"), stat("cost", "Cost, last hour"));
    const seriesError = h("div");
    const live = h("div", {id: "inflight"});
    const liveNote = h("span", {class: "small muted"});
    const tops = {route: h("div", {id: "top-route"}), provider: h("div", {id: "top-provider"}),
      key: h("div", {id: "top-key"})};
    const el = h("section", {"aria-labelledby": "overview-title"},
      h("div", {class: "panel-head"}, h("h1", {id: "overview-title", tabindex: "-1"}, "Overview"),
        h("span", {class: "small muted"}, "last 60 minutes, updated every second")),
      seriesError, cards,
      h("div", {class: "charts"}, charts.map((c) => c.el)),
      h("section", {class: "panel", "aria-labelledby": "inflight-title"},
        h("div", {class: "panel-head"}, h("h2", {id: "inflight-title"}, "In flight now"), liveNote), live),
      h("div", {class: "tops"},
        ["route", "provider", "key"].map((by) => h("section", {class: "panel", "aria-labelledby": `top-${by}-title`},
          h("h2", {id: `top-${by}-title`}, `By ${by}, last hour`), tops[by]))));

    const setStat = (key, text) => { el.querySelector(`[data-stat="${key}"]`).textContent = text; };

    function drawSeries(answer) {
      const pts = answer.points || [];
      let requests = 0; let errors = 0; let fallbacks = 0; let tokens = 0; let cost = 0;
      for (const p of pts) {
        requests += num(p.requests) || 0;
        errors += num(p.errors) || 0;
        fallbacks += num(p.fallbacks) || 0;
        tokens += (num(p.prompt_tokens) || 0) + (num(p.completion_tokens) || 0);
        cost += num(p.cost_usd) || 0;
      }
      const recent = [...pts].reverse().find((p) => num(p.requests) > 0 && num(p.p95_ms) !== null);
      setStat("requests", fmtInt(requests));
      setStat("error_rate", requests ? fmtPct((100 * errors) / requests) : "–");
      setStat("fallbacks", fmtInt(fallbacks));
      setStat("p95", recent ? fmtMs(recent.p95_ms) : "–");
      setStat("tokens", fmtShort(tokens));
      setStat("cost", fmtUsd(cost));
      for (const c of charts) c.draw(answer);
    }

    function drawLive(answer) {
      setStat("in_flight", fmtInt(answer.in_flight));
      liveNote.textContent = answer.scope ? `(${answer.scope})` : "";
      swap(live, table([
        {title: "Request", cell: (r) => h("span", {class: "id"}, r.request_id)},
        {title: "Route", cell: (r) => r.route || "–"},
        {title: "Provider", cell: (r) => r.provider || "–"},
        {title: "Key", cell: (r) => r.client || "–"},
        {title: "Door", cell: (r) => r.door || "chat"},
        {title: "Stream", cell: (r) => (r.stream ? "yes" : "no")},
        {title: "Age", num: true, cell: (r) => fmtAge(r.age_ms)},
      ], answer.requests || [], {empty: "Nothing in flight.", caption: "Requests in flight now",
        rowAttrs: (r) => ({"data-request-id": r.request_id})}));
    }

    function drawTop(by, answer) {
      swap(tops[by], table([
        {title: by[0].toUpperCase() + by.slice(1), cell: (r) => routeLink(by, r.name, by === "key" ? r.key_name : null)},
        {title: "Requests", num: true, cell: (r) => [fmtInt(r.requests), r.errors ? h("span", {class: "sub err"},
          `${fmtInt(r.errors)} ${r.errors === 1 ? "error" : "errors"}`) : null]},
        {title: "p95", num: true, cell: (r) => fmtMs(r.p95_ms)},
        {title: "Tokens", num: true, cell: (r) => fmtShort(r.tokens)},
        {title: "Cost", num: true, cell: (r) => fmtUsd(r.cost_usd)},
      ], answer.data || [], {empty: "No requests in the last hour.", caption: `Top ${by}s`,
        rowAttrs: (r) => ({"data-name": r.name})}));
    }

    const poll = poller(async () => {
      const calls = [api("GET", "stats/series?minutes=60"), api("GET", "stats/live"),
        ...["route", "provider", "key"].map((by) => api("GET", `stats/top?minutes=60&by=${by}`))];
      const [series, inflight, ...top] = await Promise.allSettled(calls);
      if (series.status === "fulfilled") { showError(seriesError, null); drawSeries(series.value); } else {
        showError(seriesError, series.reason);
      }
      if (inflight.status === "fulfilled") drawLive(inflight.value); else showError(live, inflight.reason);
      ["route", "provider", "key"].forEach((by, i) => {
        if (top[i].status === "fulfilled") drawTop(by, top[i].value); else showError(tops[by], top[i].reason);
      });
    });
    const redraw = () => charts.forEach((c) => c.draw());
    return {
      title: "Overview", el,
      start() { poll.start(); window.addEventListener("resize", redraw); },
      stop() { poll.stop(); window.removeEventListener("resize", redraw); },
    };
  }

  // -- keys --------------------------------------------------------------------------------------------
  function usageAgainst(used, limit, what) {
    if (!limit) return h("span", null, `${fmtShort(used)} ${what}`);
    return h("span", null, h("meter", {min: 0, max: limit, value: Math.min(used, limit), low: limit * 0.7,
      high: limit * 0.9, optimum: 0, "aria-label": `${what} today against the daily limit`}),
    ` ${fmtShort(used)} / ${fmtShort(limit)} ${what}`);
  }

  function limitsText(k) {
    const parts = LIMITS.filter((n) => k.effective_limits && k.effective_limits[n] !== undefined)
      .map((n) => `${n} ${fmtShort(k.effective_limits[n])}${k.limits && k.limits[n] !== undefined ? "" : "*"}`);
    return parts.length ? parts.join(" · ") : "none";
  }

  function keysView(loc) {
    const list = h("div", {id: "keys-list"});
    const errors = h("div");
    const more = h("button", {type: "button", class: "btn", hidden: true}, "Load more");
    const state = h("select", {id: "keys-state"}, h("option", {value: ""}, "every state"),
      ["active", "disabled", "revoked", "expired"].map((st) => h("option", {value: st}, st)));
    const name = h("input", {type: "search", id: "keys-name", placeholder: "name contains"});
    state.value = loc.query.get("state") || "";
    name.value = loc.query.get("name") || "";
    let rows = [];
    let cursor = null;

    async function load(append) {
      try {
        const page = await api("GET", `clients${query({state: state.value, name: name.value.trim(), limit: 100,
          cursor: append ? cursor : null})}`);
        rows = append ? rows.concat(page.data) : page.data;
        cursor = page.next_cursor;
        more.hidden = !cursor;
        showError(errors, null);
        draw();
      } catch (exc) {
        showError(errors, exc);
      }
    }

    function draw() {
      swap(list, table([
        {title: "Key", cell: (k) => [h("strong", null, routeLink("key", k.id, k.name)),
          h("span", {class: "sub id", title: `id ${k.id}`}, `${k.prefix}…`)]},
        {title: "State", cell: (k) => h("span", {class: `badge ${k.state === "active" ? "ok" : k.state === "disabled"
          ? "warn" : "err"}`, "data-state": k.state}, k.state)},
        {title: "Routes", cell: (k) => (k.routes || []).join(", ")},
        {title: "Today", cell: (k) => {
          const u = k.usage_today || {};
          const lim = k.effective_limits || {};
          return [usageAgainst(u.requests || 0, lim.rpd, "requests"), h("br"),
            usageAgainst(u.tokens || 0, lim.tpd, "tokens"), h("span", {class: "sub"}, fmtUsd(u.cost_usd))];
        }},
        {title: "Limits", cell: (k) => [limitsText(k), k.budget_usd !== null && k.budget_usd !== undefined
          ? h("span", {class: "sub"}, `budget ${fmtUsd(k.budget_usd)} / ${k.budget_period}`) : null]},
        {title: "Expires", cell: (k) => (k.expires_at ? fmtDateTime(k.expires_at) : "never")},
        {title: "Actions", cell: (k) => keyActions(k)},
      ], rows, {empty: "No client keys yet: create one.", caption: "Client keys",
        rowAttrs: (k) => ({"data-key-id": k.id, "data-key-name": k.name})}));
    }

    function keyActions(k) {
      if (k.state === "revoked") return h("span", {class: "muted small"}, "revoked for good");
      const label = `key ${k.name}`;
      return h("div", {class: "row-actions"},
        h("button", {type: "button", class: "btn small", "aria-label": `Edit ${label}`, "data-action": "edit",
          onclick: () => keyDialog(k)}, "Edit"),
        k.state === "disabled"
          ? h("button", {type: "button", class: "btn small", "aria-label": `Enable ${label}`, "data-action": "enable",
            onclick: () => setState(k, "active")}, "Enable")
          : h("button", {type: "button", class: "btn small", "aria-label": `Disable ${label}`, "data-action": "disable",
            onclick: () => setState(k, "disabled")}, "Disable"),
        h("button", {type: "button", class: "btn small", "aria-label": `Rotate ${label}`, "data-action": "rotate",
          onclick: () => rotate(k)}, "Rotate"),
        h("button", {type: "button", class: "btn small danger", "aria-label": `Revoke ${label}`,
          "data-action": "revoke", onclick: () => revoke(k)}, "Revoke"));
    }

    async function setState(k, to) {
      try {
        await api("PATCH", `clients/${encodeURIComponent(k.id)}`, {state: to});
        announce(`Key ${k.name} ${to === "active" ? "enabled" : "disabled"}.`);
        await load(false);
      } catch (exc) { showError(errors, exc); }
    }

    async function rotate(k) {
      if (!await confirmDialog(`Rotate key ${k.name}?`, "A new secret replaces the current one, which stops " +
        "working within a second. Clients need the new one.", "Rotate")) return;
      try {
        const fresh = await api("POST", `clients/${encodeURIComponent(k.id)}/rotate`);
        await secretDialog(fresh, "New secret");
        await load(false);
      } catch (exc) { showError(errors, exc); }
    }

    async function revoke(k) {
      if (!await confirmDialog(`Revoke key ${k.name}?`, "Revoking is final: the key stops working for good " +
        "(its usage and request log stay).", "Revoke")) return;
      try {
        await api("DELETE", `clients/${encodeURIComponent(k.id)}`);
        announce(`Key ${k.name} revoked.`);
        await load(false);
      } catch (exc) { showError(errors, exc); }
    }

    /** Create (k null) or edit a key: every setting of POST/PATCH clients. */
    async function keyDialog(k) {
      let full = k;
      if (k) {
        try { full = await api("GET", `clients/${encodeURIComponent(k.id)}`); } catch (exc) {
          showError(errors, exc);
          return;
        }
      }
      const v = full || {};
      const routes = (v.routes || []).filter((r) => r !== "*").join(", ");
      const inputs = {
        name: h("input", {type: "text", id: "key-name", required: true, value: v.name || "", autocomplete: "off"}),
        routes: h("input", {type: "text", id: "key-routes", value: routes, placeholder: "every route"}),
        budget: h("input", {type: "text", id: "key-budget", inputmode: "decimal", value: v.budget_usd || "",
          placeholder: "no budget"}),
        budget_period: h("select", {id: "key-budget-period"}, BUDGET_PERIODS.map((p) => h("option", {value: p}, p))),
        max_tokens: h("input", {type: "number", id: "key-max-tokens", min: 1, value: v.max_tokens || ""}),
        expires_at: h("input", {type: "text", id: "key-expires", value: v.expires_at || "",
          placeholder: "never (or 30d, 2027-01-31)"}),
        system_prompt: h("textarea", {id: "key-system-prompt", rows: 2}, v.system_prompt || ""),
        metadata: h("textarea", {id: "key-metadata", rows: 2},
          v.metadata && Object.keys(v.metadata).length ? JSON.stringify(v.metadata) : ""),
      };
      inputs.budget_period.value = v.budget_period || "month";
      const limitInputs = {};
      for (const n of LIMITS) {
        limitInputs[n] = h("input", {type: "number", id: `key-limit-${n}`, min: 1,
          value: v.limits && v.limits[n] !== undefined ? v.limits[n] : "",
          placeholder: v.effective_limits && v.effective_limits[n] !== undefined
            ? `default ${v.effective_limits[n]}` : "none"});
      }
      const errs = h("div");
      const submit = h("button", {type: "submit", class: "btn primary"}, k ? "Save" : "Create key");
      const spent = full && full.usage_budget_period && full.budget_usd
        ? h("p", {class: "small muted"}, `Spent this ${full.budget_period}: ${fmtUsd(full.usage_budget_period.cost_usd)}` +
          ` of ${fmtUsd(full.budget_usd)}.`) : null;
      const form = h("form", {novalidate: true},
        field("Name", inputs.name),
        field("Routes", inputs.routes, "Route names or patterns such as gpt-*, comma separated; empty: every route."),
        h("fieldset", null, h("legend", null, "Limits (empty: the config's default)"),
          h("div", {class: "fields"}, LIMITS.map((n) => field(LIMIT_NAMES[n], limitInputs[n])))),
        h("div", {class: "fields"}, field("Budget (USD)", inputs.budget), field("per", inputs.budget_period),
          field("max_tokens", inputs.max_tokens)),
        spent,
        field("Expires", inputs.expires_at, "Empty: never. A date, a time (UTC) or 30d, 12h, 2w from now."),
        field("System prompt", inputs.system_prompt),
        field("Metadata (JSON object)", inputs.metadata),
        errs,
        h("div", {class: "actions"}, h("button", {type: "button", class: "btn", onclick: () => dlg.close()}, "Cancel"),
          submit));
      const dlg = modal(k ? `Edit key ${k.name}` : "New key", form);
      inputs.name.focus();

      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        const problems = [];
        const body = {};
        const text = (el) => el.value.trim();
        const numOrNull = (el, path) => {
          const t = text(el);
          if (!t) return null;
          const n = Number(t);
          if (!Number.isInteger(n) || n < 1) problems.push(`${path}: must be a whole number of 1 or more`);
          return n;
        };
        body.name = text(inputs.name);
        if (!body.name) problems.push("name: required");
        const r = text(inputs.routes);
        body.routes = r ? r.split(",").map((x) => x.trim()).filter(Boolean) : null;
        body.limits = {};
        for (const n of LIMITS) body.limits[n] = numOrNull(limitInputs[n], `limits.${n}`);
        body.budget = text(inputs.budget) || null;
        body.budget_period = body.budget ? inputs.budget_period.value : null;
        body.max_tokens = numOrNull(inputs.max_tokens, "max_tokens");
        body.expires_at = text(inputs.expires_at) || null;
        body.system_prompt = inputs.system_prompt.value || null;
        const meta = text(inputs.metadata);
        body.metadata = null;
        if (meta) {
          try {
            body.metadata = JSON.parse(meta);
            if (!body.metadata || typeof body.metadata !== "object" || Array.isArray(body.metadata)) throw new Error();
          } catch (exc) { problems.push("metadata: must be a JSON object, such as {\"team\": \"search\"}"); }
        }
        if (problems.length) {
          showError(errs, new ApiError(400, {message: "invalid", problems}));
          return;
        }
        let send = body;
        if (k) {
          send = changed(full, body);
          if (!Object.keys(send).length) { dlg.close(); return; }
        } else {
          send = {};
          for (const [key, val] of Object.entries(body)) if (val !== null) send[key] = val;
          const lim = {};
          for (const n of LIMITS) if (body.limits[n] !== null) lim[n] = body.limits[n];
          if (Object.keys(lim).length) send.limits = lim; else delete send.limits;
        }
        submit.disabled = true;
        try {
          const answer = await api(k ? "PATCH" : "POST", k ? `clients/${encodeURIComponent(k.id)}` : "clients", send);
          dlg.close();
          if (!k) await secretDialog(answer, "New key created");
          else announce(`Key ${answer.name} saved.`);
          await load(false);
        } catch (exc) {
          showError(errs, exc);
        } finally {
          submit.disabled = false;
        }
      });
    }

    /** The fields of the form that differ from the key as read (PATCH sends only those). */
    function changed(k, body) {
      const out = {};
      if (body.name !== k.name) out.name = body.name;
      const before = (k.routes || []).filter((r) => r !== "*");
      if (JSON.stringify(body.routes || []) !== JSON.stringify(before)) out.routes = body.routes;
      const lim = {};
      for (const n of LIMITS) {
        const old = k.limits && k.limits[n] !== undefined ? k.limits[n] : null;
        if (body.limits[n] !== old) lim[n] = body.limits[n];
      }
      if (Object.keys(lim).length) out.limits = lim;
      if ((body.budget || null) !== (k.budget_usd || null) && num(body.budget) !== num(k.budget_usd)) {
        out.budget = body.budget;
      }
      if (body.budget && body.budget_period !== k.budget_period) out.budget_period = body.budget_period;
      if (body.max_tokens !== (k.max_tokens ?? null)) out.max_tokens = body.max_tokens;
      if (body.expires_at !== (k.expires_at || null)) out.expires_at = body.expires_at;
      if (body.system_prompt !== (k.system_prompt || null)) out.system_prompt = body.system_prompt;
      const oldMeta = k.metadata && Object.keys(k.metadata).length ? k.metadata : null;
      if (JSON.stringify(body.metadata) !== JSON.stringify(oldMeta)) out.metadata = body.metadata;
      return out;
    }

    const filters = h("form", {class: "toolbar", role: "search", onsubmit: (ev) => { ev.preventDefault(); load(false); }},
      h("label", {for: "keys-state", class: "sr-only"}, "State"), state,
      h("label", {for: "keys-name", class: "sr-only"}, "Name"), name,
      h("button", {type: "submit", class: "btn"}, "Filter"), h("span", {class: "grow"}),
      h("button", {type: "button", class: "btn primary", id: "new-key", onclick: () => keyDialog(null)}, "New key"));
    state.addEventListener("change", () => load(false));
    more.addEventListener("click", () => load(true));
    const el = h("section", null, heading("Keys", h("span", {class: "small muted"},
      "client keys of the store; * marks a limit from the config's defaults")), filters, errors, list, more);
    return {title: "Keys", el, start() { load(false); }};
  }

  // -- providers and routes ----------------------------------------------------------------------------
  async function allPages(path) {
    let out = [];
    let cursor = null;
    do {
      const page = await api("GET", `${path}${query({limit: 1000, cursor})}`);
      out = out.concat(page.data);
      cursor = page.next_cursor;
    } while (cursor);
    return out;
  }

  function providersView() {
    const list = h("div", {id: "providers-list"});
    const errors = h("div");
    let rows = [];

    async function load() {
      try {
        rows = await allPages("providers");
        showError(errors, null);
        draw();
      } catch (exc) { showError(errors, exc); }
    }

    function draw() {
      swap(list, table([
        {title: "Name", cell: (p) => h("strong", null, p.name)},
        {title: "Type", cell: (p) => p.type},
        {title: "Base URL", cell: (p) => h("span", {class: "id"}, p.base_url || "default")},
        {title: "Source", cell: (p) => sourceBadge(p)},
        {title: "Actions", cell: (p) => h("div", {class: "row-actions"},
          h("button", {type: "button", class: "btn small", "data-action": "test", "aria-label": `Test provider ${p.name}`,
            onclick: () => testDialog(p)}, "Test"),
          h("button", {type: "button", class: "btn small", "data-action": "edit", "aria-label": `Edit provider ${p.name}`,
            onclick: () => edit(p)}, "Edit"),
          p.source === "database"
            ? h("button", {type: "button", class: "btn small danger", "data-action": "delete",
              "aria-label": `Delete provider ${p.name}`, onclick: () => remove(p)}, "Delete")
            : h("button", {type: "button", class: "btn small", disabled: true,
              title: "defined in the config file: change the file and reload"}, "Delete"))},
      ], rows, {empty: "No providers.", caption: "Providers", rowAttrs: (p) => ({"data-name": p.name})}));
    }

    function edit(p) {
      jsonDialog(`Edit provider ${p.name}`, editable(p), async (spec) => {
        await api("PUT", `providers/${encodeURIComponent(p.name)}`, spec);
        announce(`Provider ${p.name} saved.`);
        await load();
      }, h("p", {class: "small muted"}, "Secrets are shown masked; leave them as they are to keep them. ",
        p.source === "config" ? "Saving stores this provider in the database, where it overrides the config file's." : ""));
    }

    function add() {
      const type = h("select", {id: "new-provider-type"}, PROVIDER_TYPES.map((t) => h("option", {value: t}, t)));
      const template = (t) => t === "echo" ? {name: "", type: t}
        : t === "azure" ? {name: "", type: t, base_url: "https://RESOURCE.openai.azure.com", api_key: ""}
          : t === "vertex" ? {name: "", type: t, project: "", location: "us-central1", credentials_file: ""}
            : {name: "", type: t, base_url: t === "openai" ? "https://api.openai.com/v1" : undefined, api_key: ""};
      const dlg = jsonDialog("New provider", template("openai"), async (spec) => {
        await api("POST", "providers", spec);
        announce(`Provider ${spec.name} added.`);
        await load();
      }, field("Template for type", type, "Fills the JSON below; every provider option of the config file works."));
      type.addEventListener("change", () => {
        $("#spec-json", dlg).value = JSON.stringify(template(type.value), null, 2);
      });
    }

    async function remove(p) {
      const text = p.overrides_config ? "The database entry is deleted and the config file's entry of the same " +
        "name is used again." : "Routes that still use it must be changed first.";
      if (!await confirmDialog(`Delete provider ${p.name}?`, text, "Delete")) return;
      try {
        await api("DELETE", `providers/${encodeURIComponent(p.name)}`);
        announce(`Provider ${p.name} deleted.`);
        await load();
      } catch (exc) { showError(errors, exc); }
    }

    function testDialog(p) {
      const model = h("input", {type: "text", id: "test-model", placeholder: "the model a route uses it with"});
      const out = h("div", {id: "test-result", "aria-live": "polite"});
      const run = h("button", {type: "submit", class: "btn primary"}, "Run test");
      const form = h("form", {novalidate: true},
        h("p", {class: "small muted"}, "Sends one chat request of one token (\"ping\") through the provider as built now."),
        field("Model (optional)", model), out,
        h("div", {class: "actions"}, h("button", {type: "button", class: "btn", onclick: () => dlg.close()}, "Close"), run));
      const dlg = modal(`Test provider ${p.name}`, form);
      model.focus();
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        run.disabled = true;
        out.replaceChildren(h("p", {class: "muted"}, "Testing…"));
        try {
          const body = model.value.trim() ? {model: model.value.trim()} : {};
          const r = await api("POST", `providers/${encodeURIComponent(p.name)}/test`, body);
          out.replaceChildren(h("div", {class: r.ok ? "good" : "alert", "data-ok": String(r.ok)},
            r.ok ? `OK: ${r.model} answered in ${fmtMs(r.latency_ms)}.`
              : `Failed${r.status ? ` (${r.status})` : ""} after ${fmtMs(r.latency_ms)}: ${r.error || "no answer"}`));
        } catch (exc) {
          showError(out, exc);
        } finally {
          run.disabled = false;
        }
      });
    }

    const el = h("section", null, heading("Providers", h("span", {class: "small muted"},
      "the config file's (YAML) and the database's, merged by name")),
    h("div", {class: "toolbar"}, h("span", {class: "grow"}),
      h("button", {type: "button", class: "btn primary", id: "new-provider", onclick: add}, "New provider")),
    errors, list);
    return {title: "Providers", el, start: load};
  }

  function stepsText(steps) {
    return h("ol", {class: "steps"}, (steps || []).map((st) => h("li", null, h("strong", null, st.provider), " · ",
      st.model, st.timeout !== undefined ? h("span", {class: "muted"}, ` · ${st.timeout}${typeof st.timeout === "number"
        ? "s" : ""}`) : null)));
  }

  function routesView() {
    const list = h("div", {id: "routes-list"});
    const errors = h("div");
    let rows = [];
    let providers = [];

    async function load() {
      try {
        [rows, providers] = await Promise.all([allPages("routes"), allPages("providers")]);
        showError(errors, null);
        draw();
      } catch (exc) { showError(errors, exc); }
    }

    function draw() {
      swap(list, table([
        {title: "Name", cell: (r) => routeLink("route", r.name)},
        {title: "Steps (in order)", cell: (r) => stepsText(r.steps)},
        {title: "Limits", cell: (r) => (r.limits ? LIMITS.filter((n) => r.limits[n] !== undefined)
          .map((n) => `${n} ${fmtShort(r.limits[n])}`).join(" · ") : "") || h("span", {class: "muted"}, "none")},
        {title: "Source", cell: (r) => sourceBadge(r)},
        {title: "Actions", cell: (r) => h("div", {class: "row-actions"},
          h("button", {type: "button", class: "btn small", "data-action": "edit", "aria-label": `Edit route ${r.name}`,
            onclick: () => routeDialog(r)}, "Edit"),
          h("button", {type: "button", class: "btn small", "data-action": "json",
            "aria-label": `Edit route ${r.name} as JSON`, onclick: () => jsonEdit(r)}, "JSON"),
          r.source === "database"
            ? h("button", {type: "button", class: "btn small danger", "data-action": "delete",
              "aria-label": `Delete route ${r.name}`, onclick: () => remove(r)}, "Delete")
            : h("button", {type: "button", class: "btn small", disabled: true,
              title: "defined in the config file: change the file and reload"}, "Delete"))},
      ], rows, {empty: "No routes.", caption: "Routes", rowAttrs: (r) => ({"data-name": r.name})}));
    }

    function jsonEdit(r) {
      jsonDialog(`Edit route ${r.name}`, editable(r), async (spec) => {
        await api("PUT", `routes/${encodeURIComponent(r.name)}`, spec);
        announce(`Route ${r.name} saved.`);
        await load();
      });
    }

    async function remove(r) {
      const text = r.overrides_config ? "The database entry is deleted and the config file's route of the same " +
        "name is used again." : "Clients asking for this model get 404 model_not_found afterwards.";
      if (!await confirmDialog(`Delete route ${r.name}?`, text, "Delete")) return;
      try {
        await api("DELETE", `routes/${encodeURIComponent(r.name)}`);
        announce(`Route ${r.name} deleted.`);
        await load();
      } catch (exc) { showError(errors, exc); }
    }

    /** The form for a route's name, steps and limits; other fields of an existing route are kept. */
    function routeDialog(r) {
      const name = h("input", {type: "text", id: "route-name", required: true, value: r ? r.name : "",
        readOnly: Boolean(r), autocomplete: "off"});
      const stepsBox = h("div", {id: "route-steps"});
      const original = r ? (r.steps || []) : [];
      const stepRows = [];

      function stepRow(st) {
        const prov = h("select", {"data-field": "provider"},
          providers.map((p) => h("option", {value: p.name}, `${p.name} (${p.type})`)));
        if (st && st.provider) prov.value = st.provider;
        const model = h("input", {type: "text", "data-field": "model", value: st ? st.model || "" : "",
          autocomplete: "off"});
        const timeout = h("input", {type: "text", "data-field": "timeout",
          value: st && st.timeout !== undefined ? String(st.timeout) : "", placeholder: "default"});
        const row = {prov, model, timeout, extra: st || {}};
        const removeBtn = h("button", {type: "button", class: "btn small", "aria-label": "Remove this step",
          onclick: () => {
            stepRows.splice(stepRows.indexOf(row), 1);
            row.el.remove();
            renumber();
          }}, "Remove");
        row.el = h("div", {class: "step-row"}, field("Provider", prov), field("Model", model),
          field("Timeout (s)", timeout), removeBtn);
        stepRows.push(row);
        stepsBox.append(row.el);
        renumber();
        return row;
      }

      function renumber() {
        stepRows.forEach((row, i) => {
          for (const [el, what] of [[row.prov, "provider"], [row.model, "model"], [row.timeout, "timeout"]]) {
            const lab = el.parentElement && el.parentElement.querySelector("label");
            if (lab) lab.textContent = `Step ${i + 1} ${what}`;
          }
        });
      }

      const limitInputs = {};
      for (const n of LIMITS) {
        limitInputs[n] = h("input", {type: "number", id: `route-limit-${n}`, min: 1,
          value: r && r.limits && r.limits[n] !== undefined ? r.limits[n] : "", placeholder: "none"});
      }
      const errs = h("div");
      const submit = h("button", {type: "submit", class: "btn primary"}, r ? "Save" : "Add route");
      const form = h("form", {novalidate: true},
        r && r.source === "config" ? h("p", {class: "note small"}, "This route comes from the config file: saving " +
          "stores it in the database, where it overrides the file's (deleting it there brings the file's back).") : null,
        field("Name (the model clients ask for)", name),
        h("fieldset", null, h("legend", null, "Steps, tried in order until one succeeds"), stepsBox,
          h("button", {type: "button", class: "btn small", id: "add-step", onclick: () => stepRow(null).model.focus()},
            "Add step")),
        h("fieldset", null, h("legend", null, "Route limits (empty: none)"),
          h("div", {class: "fields"}, LIMITS.map((n) => field(LIMIT_NAMES[n], limitInputs[n])))),
        errs,
        h("div", {class: "actions"}, h("button", {type: "button", class: "btn", onclick: () => dlg.close()}, "Cancel"),
          submit));
      const dlg = modal(r ? `Edit route ${r.name}` : "New route", form);
      (original.length ? original : [null]).forEach(stepRow);
      (r ? stepRows[0].model : name).focus();

      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        const spec = r ? editable(r) : {};
        spec.name = name.value.trim();
        spec.steps = stepRows.map((row) => {
          const st = {...row.extra, provider: row.prov.value, model: row.model.value.trim()};
          const t = row.timeout.value.trim();
          if (!t) delete st.timeout;
          else st.timeout = /^\d+(\.\d+)?$/.test(t) ? Number(t) : t;
          return st;
        });
        const limits = {};
        for (const n of LIMITS) {
          const t = limitInputs[n].value.trim();
          if (t) limits[n] = Number(t);
        }
        if (Object.keys(limits).length) spec.limits = limits; else delete spec.limits;
        submit.disabled = true;
        try {
          if (r) await api("PUT", `routes/${encodeURIComponent(r.name)}`, spec);
          else await api("POST", "routes", spec);
          dlg.close();
          announce(`Route ${spec.name} saved.`);
          await load();
        } catch (exc) {
          showError(errs, exc);
        } finally {
          submit.disabled = false;
        }
      });
    }

    const el = h("section", null, heading("Routes", h("span", {class: "small muted"},
      "a route is the model name clients ask for: its steps are tried in order")),
    h("div", {class: "toolbar"}, h("span", {class: "grow"}),
      h("button", {type: "button", class: "btn primary", id: "new-route", onclick: () => routeDialog(null)},
        "New route")),
    errors, list);
    return {title: "Routes", el, start: load};
  }

  // -- the request log ---------------------------------------------------------------------------------
  const SINCE = [["", "any time"], ["15m", "last 15 minutes"], ["1h", "last hour"], ["24h", "last 24 hours"],
    ["7d", "last 7 days"]];

  function localInput(id, value) {
    return h("input", {type: "datetime-local", id, step: 1, value: value || ""});
  }

  function unixOf(local) {
    const d = local ? new Date(local) : null;
    return d && !Number.isNaN(d.getTime()) ? String(Math.floor(d.getTime() / 1000)) : null;
  }

  function requestsView(loc) {
    const q = loc.query;
    const f = {
      key: h("input", {type: "text", id: "rq-key", list: "rq-keys", value: q.get("key") || "", placeholder: "key id",
        autocomplete: "off"}),
      route: h("input", {type: "text", id: "rq-route", list: "rq-routes", value: q.get("route") || "",
        autocomplete: "off"}),
      provider: h("input", {type: "text", id: "rq-provider", value: q.get("provider") || "", autocomplete: "off"}),
      status: h("input", {type: "text", id: "rq-status", list: "rq-statuses", value: q.get("status") || "",
        placeholder: "200, 4xx, 5xx", autocomplete: "off"}),
      since: h("select", {id: "rq-since"}, SINCE.map(([v, t]) => h("option", {value: v}, t))),
      from: localInput("rq-from", q.get("from")),
      until: localInput("rq-until", q.get("until")),
    };
    f.since.value = q.get("since") || "";
    const keysList = h("datalist", {id: "rq-keys"});
    const routesList = h("datalist", {id: "rq-routes"});
    const statuses = h("datalist", {id: "rq-statuses"},
      ["2xx", "4xx", "5xx", "200", "400", "401", "403", "404", "429", "500", "502", "504"].map((v) => h("option", {value: v})));
    const liveBox = h("input", {type: "checkbox", id: "rq-live", checked: true});
    const list = h("div", {id: "requests-list"});
    const errors = h("div");
    const more = h("button", {type: "button", class: "btn", hidden: true}, "Load more");
    let rows = [];
    let cursor = null;
    let paged = false;

    function params() {
      const since = unixOf(f.from.value) || f.since.value || null;
      return {key: f.key.value.trim(), route: f.route.value.trim(), provider: f.provider.value.trim(),
        status: f.status.value.trim(), since, until: unixOf(f.until.value)};
    }

    async function load(append) {
      const page = await api("GET", `requests${query({...params(), limit: 50, cursor: append ? cursor : null})}`);
      if (append) { rows = rows.concat(page.data); paged = true; } else if (!paged) rows = page.data;
      else { // keep the pages read, put the new rows first
        const seen = new Set(rows.map((r) => `${r.id}|${r.time}`));
        rows = page.data.filter((r) => !seen.has(`${r.id}|${r.time}`)).concat(rows);
      }
      if (append || !paged) cursor = page.next_cursor;
      more.hidden = !cursor;
      showError(errors, null);
      draw();
    }

    function draw() {
      swap(list, table([
        {title: "Time", cell: (r) => h("span", {title: r.time}, fmtDateTime(r.time))},
        {title: "Status", cell: (r) => [statusBadge(r.status), r.outcome && r.outcome !== "ok"
          ? h("span", {class: "sub"}, r.outcome) : null]},
        {title: "Route", cell: (r) => r.route || "–"},
        {title: "Provider · model", cell: (r) => (r.provider ? `${r.provider} · ${r.model || ""}` : "–")},
        {title: "Key", cell: (r) => (r.key ? [r.key_name || r.key, h("span", {class: "sub id"}, r.key)] : "–")},
        {title: "Attempts", num: true, cell: (r) => fmtInt(r.attempts)},
        {title: "Latency", num: true, cell: (r) => fmtMs(r.latency_ms)},
        {title: "Tokens", num: true, cell: (r) => fmtShort((num(r.prompt_tokens) || 0) + (num(r.completion_tokens) || 0))},
        {title: "Cost", num: true, cell: (r) => (r.cost_usd === null ? "–" : fmtUsd(r.cost_usd))},
        {title: "Request", cell: (r) => h("a", {class: "id", href: `#/requests/${encodeURIComponent(r.id)}`,
          "aria-label": `Request ${r.id}: details`}, r.id)},
      ], rows, {empty: "No requests match.", caption: "Request log",
        rowAttrs: (r) => ({"data-request-id": r.id})}));
    }

    const poll = poller(async () => {
      if (!liveBox.checked) return;
      try { await load(false); } catch (exc) { showError(errors, exc); throw exc; }
    });

    function apply(ev) {
      ev.preventDefault();
      const p = {key: f.key.value.trim(), route: f.route.value.trim(), provider: f.provider.value.trim(),
        status: f.status.value.trim(), since: f.since.value, from: f.from.value, until: f.until.value};
      const hash = `#/requests${query(p)}`;
      if (location.hash === hash) { paged = false; poll.now(); } else location.hash = hash;
    }

    function reset() {
      location.hash = "#/requests";
    }

    more.addEventListener("click", async () => {
      try { await load(true); } catch (exc) { showError(errors, exc); }
    });
    liveBox.addEventListener("change", () => poll.now());
    const form = h("form", {class: "panel", id: "rq-form", role: "search", onsubmit: apply,
      "aria-label": "Filter the request log"},
      h("div", {class: "filters"}, field("Key", f.key), field("Route", f.route), field("Provider", f.provider),
        field("Status", f.status), field("Time", f.since), field("From", f.from), field("Until", f.until)),
      h("div", {class: "toolbar"}, h("button", {type: "submit", class: "btn primary"}, "Apply"),
        h("button", {type: "button", class: "btn", onclick: reset}, "Clear"), h("span", {class: "grow"}),
        h("label", {class: "check", for: "rq-live"}, liveBox, "Follow new requests (every second)")),
      keysList, routesList, statuses);
    const el = h("section", null, heading("Request log", h("span", {class: "small muted"}, "newest first")),
      form, errors, list, more);

    async function suggestions() {
      try {
        const [keys, routes] = await Promise.all([api("GET", "clients?limit=1000"), allPages("routes")]);
        keysList.replaceChildren(...keys.data.map((k) => h("option", {value: k.id}, k.name)));
        routesList.replaceChildren(...routes.map((r) => h("option", {value: r.name})));
      } catch (exc) { /* suggestions only: the filters work without them */ }
    }

    return {title: "Request log", el, start() { poll.start(); suggestions(); }, stop() { poll.stop(); }};
  }

  function requestDetailView(loc, args) {
    const id = decodeURIComponent(args[0]);
    const body = h("div", {id: "request-detail"}, h("p", {class: "muted"}, "Loading…"));
    const el = h("section", null, heading(`Request ${id}`), h("p", null, h("a", {href: "#/requests"}, "← Request log")),
      body);

    function kv(pairs) {
      return h("dl", {class: "kv"}, pairs.filter(([, v]) => v !== undefined).map(([k, v]) => [h("dt", null, k),
        h("dd", null, v === null || v === "" ? "–" : v)]));
    }

    async function load() {
      let r;
      try {
        r = await api("GET", `requests/${encodeURIComponent(id)}`);
      } catch (exc) {
        showError(body, exc);
        return;
      }
      const failed = Array.isArray(r.failed_attempts) ? r.failed_attempts : [];
      const attempts = failed.map((a) => ({...a, ok: false}));
      if (r.provider && r.status !== null && r.status < 400) {
        attempts.push({step: failed.length ? Math.max(...failed.map((a) => num(a.step) ?? 0)) + 1 : 0,
          provider: r.provider, model: r.model, status: r.status, error: null, ok: true});
      }
      body.replaceChildren(
        h("div", {class: "panel"}, kv([
          ["Time", fmtDateTime(r.time)], ["Status", statusBadge(r.status)], ["Outcome", r.outcome],
          ["Method and path", `${r.method || ""} ${r.path || ""}`], ["Route", r.route],
          ["Provider", r.provider], ["Model", r.model],
          ["Key", r.key ? (r.key_name ? `${r.key_name} (${r.key})` : r.key) : null],
          ["Stream", r.stream ? "yes" : "no"],
          ["Latency", fmtMs(r.latency_ms)], ["Time to first byte", fmtMs(r.ttfb_ms)],
          ["Tokens", `${fmtInt(r.prompt_tokens)} prompt, ${fmtInt(r.completion_tokens)} completion` +
            `${r.cached_tokens ? `, ${fmtInt(r.cached_tokens)} cached` : ""}` +
            `${r.reasoning_tokens ? `, ${fmtInt(r.reasoning_tokens)} reasoning` : ""}`],
          ["Cost", r.cost_usd === null ? "not priced" : fmtUsd(r.cost_usd)],
          ["Error", r.error], ["Metadata", r.metadata ? h("code", null, JSON.stringify(r.metadata)) : null],
        ])),
        h("section", {class: "panel", "aria-labelledby": "attempts-title"},
          h("h2", {id: "attempts-title"}, `Attempts (${fmtInt(r.attempts)})`),
          h("div", {id: "attempts"}, table([
            {title: "Step", num: true, cell: (a) => String(num(a.step) === null ? "–" : num(a.step) + 1)},
            {title: "Provider", cell: (a) => a.provider || "–"},
            {title: "Model", cell: (a) => a.model || "–"},
            {title: "Status", cell: (a) => (a.status === null || a.status === undefined ? h("span", {class: "badge err"},
              "no answer") : statusBadge(a.status))},
            {title: "Result", cell: (a) => (a.ok ? h("span", {class: "badge ok"}, "answered") : a.error || "failed")},
          ], attempts, {empty: "No attempt reached a provider.", caption: "Attempts"}))));
    }

    return {title: `Request ${id}`, el, start: load};
  }

  // -- usage -------------------------------------------------------------------------------------------
  const GROUPS = ["day", "key", "route", "provider", "model"];

  function usageView(loc) {
    const q = loc.query;
    const chosen = new Set((q.get("group_by") || "day").split(",").filter((g) => GROUPS.includes(g)));
    const boxes = {};
    for (const g of GROUPS) boxes[g] = h("input", {type: "checkbox", id: `usage-by-${g}`, checked: chosen.has(g)});
    const since = h("select", {id: "usage-since"}, [["1d", "today"], ["7d", "last 7 days"], ["30d", "last 30 days"],
      ["90d", "last 90 days"], ["", "all time"]].map(([v, t]) => h("option", {value: v}, t)));
    since.value = q.has("since") ? q.get("since") : "7d";
    const until = h("input", {type: "date", id: "usage-until", value: q.get("until") || ""});
    const list = h("div", {id: "usage-list"});
    const errors = h("div");
    const csv = h("a", {class: "btn", id: "usage-csv", download: "usage.csv"}, "Download CSV");
    const more = h("button", {type: "button", class: "btn", hidden: true}, "Load more");
    let rows = [];
    let total = null;
    let cursor = null;
    let groups = [];

    function params() {
      return {group_by: GROUPS.filter((g) => boxes[g].checked).join(",") || "day", since: since.value,
        until: until.value};
    }

    async function load(append) {
      const p = params();
      csv.href = `${API}usage${query({...p, format: "csv"})}`;
      try {
        const page = await api("GET", `usage${query({...p, limit: 500, cursor: append ? cursor : null})}`);
        groups = page.group_by || p.group_by.split(",");
        rows = append ? rows.concat(page.data) : page.data;
        total = page.total;
        cursor = page.next_cursor;
        more.hidden = !cursor;
        showError(errors, null);
        draw();
      } catch (exc) { showError(errors, exc); }
    }

    function draw() {
      const cols = groups.map((g) => ({title: g[0].toUpperCase() + g.slice(1), cell: (r) => r.total ? (g === groups[0]
        ? "Total" : "") : g === "key" ? [r.key_name || "", h("span", {class: "sub id"}, r.key || "–")] : (r[g] ?? "–")}));
      const shown = total ? rows.concat([{...total, total: true}]) : rows;
      swap(list, table([...cols,
        {title: "Requests", num: true, cell: (r) => fmtInt(r.requests)},
        {title: "Errors", num: true, cell: (r) => fmtInt(r.errors)},
        {title: "Prompt tokens", num: true, cell: (r) => fmtInt(r.prompt_tokens)},
        {title: "Completion tokens", num: true, cell: (r) => fmtInt(r.completion_tokens)},
        {title: "Cost", num: true, cell: (r) => [fmtUsd(r.cost_usd), r.unpriced ? h("span", {class: "sub"},
          `${fmtInt(r.unpriced)} unpriced`) : null]},
      ], shown, {empty: "No usage in this period.", caption: "Usage",
        rowAttrs: (r) => (r.total ? {class: "total"} : null)}));
    }

    const form = h("form", {class: "panel", id: "usage-form", "aria-label": "Usage grouping and period",
      onsubmit: (ev) => {
        ev.preventDefault();
        const hash = `#/usage${query(params())}`;
        if (location.hash === hash) load(false); else location.hash = hash;
      }},
    h("fieldset", null, h("legend", null, "Group by"),
      h("div", {class: "toolbar"}, GROUPS.map((g) => h("label", {class: "check", for: `usage-by-${g}`}, boxes[g], g)))),
    h("div", {class: "filters"}, field("Since", since), field("Until (day, inclusive)", until)),
    h("div", {class: "toolbar"}, h("button", {type: "submit", class: "btn primary"}, "Show"), csv));
    more.addEventListener("click", () => load(true));
    const el = h("section", null, heading("Usage", h("span", {class: "small muted"},
      "daily aggregates; days in the budget time zone")), form, errors, list, more);
    return {title: "Usage", el, start() { load(false); }};
  }

  // -- sign-in -----------------------------------------------------------------------------------------
  // The hash stays what it was while the login shows: after login, the page asked for (a bookmark) opens.
  const app = {session: null, view: null, expiry: 0, message: null};

  function loginView() {
    const token = h("input", {type: "password", id: "login-token", name: "token", required: true,
      autocomplete: "current-password", spellcheck: "false"});
    const errors = h("div", {id: "login-error"});
    const submit = h("button", {type: "submit", class: "btn primary", id: "login-submit"}, "Log in");
    const form = h("form", {novalidate: true}, field("Admin token", token,
      "One of the gateway's admin tokens (admin_token in the config). It is exchanged for a session cookie."),
    errors, submit);
    const el = h("section", {class: "login panel"}, h("h1", {tabindex: "-1"}, "Log in"),
      app.message ? h("p", {class: "note", role: "status"}, app.message) : null, form);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      if (!token.value) {
        showError(errors, new Error("Enter an admin token."));
        token.focus();
        return;
      }
      submit.disabled = true;
      try {
        await api("POST", "login", {token: token.value}, {login: true, page: true});
        token.value = "";
        await signedIn();
      } catch (exc) {
        const text = exc instanceof ApiError && exc.status === 401 ? "That is not an admin token."
          : exc instanceof ApiError && exc.status === 429 ? "Too many failed logins from here: wait a minute."
            : null;
        showError(errors, text ? new Error(text) : exc);
        token.focus();
        token.select();
      } finally {
        submit.disabled = false;
      }
    });
    return {title: "Log in", el, focus: token};
  }

  async function signedIn() {
    app.session = await api("GET", "session", undefined, {login: true});
    app.message = null;
    $("#actor").textContent = app.session.actor || "";
    const expires = num(app.session.expires_at);
    clearTimeout(app.expiry);
    if (expires) {
      $("#actor").textContent = `${app.session.actor || ""} · until ${fmtTime(expires).slice(0, 5)}`;
      $("#actor").title = `logged in until ${fmtDateTime(expires)}`;
      const wait = Math.min(2147483000, Math.max(0, expires * 1000 - Date.now()));
      app.expiry = setTimeout(() => signedOut("Your session expired: log in again."), wait);
    }
    if (!location.hash.startsWith("#/")) location.hash = "#/overview"; else render();
  }

  function signedOut(message) {
    if (!app.session && app.view && app.view.title === "Log in") return;
    app.session = null;
    app.message = message || null;
    clearTimeout(app.expiry);
    render();
  }

  async function logout() {
    try { await api("POST", "logout", undefined, {login: true, page: true}); } catch (exc) { /* gone anyway */ }
    signedOut("You are logged out.");
  }

  // -- the router --------------------------------------------------------------------------------------
  const VIEWS = [
    [/^\/overview$/, overviewView], [/^\/keys$/, keysView], [/^\/providers$/, providersView],
    [/^\/routes$/, routesView], [/^\/requests$/, requestsView], [/^\/requests\/(.+)$/, requestDetailView],
    [/^\/usage$/, usageView],
  ];

  function where() {
    const raw = location.hash.replace(/^#/, "");
    if (raw && !raw.startsWith("/")) return null; // #main (the skip link): not a route
    const [path, q] = (raw || "/overview").split(/\?(.*)/s, 2);
    return {path, query: new URLSearchParams(q || "")};
  }

  function render() {
    let loc = where();
    if (!loc) {
      if (app.view) return; // an in-page anchor: not a route change
      loc = {path: "/overview", query: new URLSearchParams()};
    }
    if (app.view && app.view.stop) app.view.stop();
    document.querySelectorAll("dialog").forEach((d) => d.close());
    let view;
    const nav = $("#nav");
    if (!app.session) {
      view = loginView();
      nav.hidden = true;
      $("#who").hidden = true;
    } else {
      let found = null;
      for (const [re, fn] of VIEWS) {
        const m = re.exec(loc.path);
        if (m) { found = [fn, m.slice(1)]; break; }
      }
      if (!found) { location.replace("#/overview"); return; }
      view = found[0](loc, found[1]);
      nav.hidden = false;
      $("#who").hidden = false;
      const section = `#/${loc.path.split("/")[1]}`;
      nav.querySelectorAll("a").forEach((a) => {
        if (a.getAttribute("href") === section) a.setAttribute("aria-current", "page");
        else a.removeAttribute("aria-current");
      });
    }
    app.view = view;
    const main = $("#main");
    main.replaceChildren(view.el);
    document.title = `${view.title} · at-gateway`;
    const target = view.focus || view.el.querySelector("h1");
    if (target) target.focus();
    if (view.start) view.start();
  }

  async function boot() {
    $("#logout").addEventListener("click", logout);
    $(".skip").addEventListener("click", (ev) => { // to the content, without touching the hash route
      ev.preventDefault();
      $("#main").focus();
    });
    window.addEventListener("hashchange", render);
    // The CSRF cookie lives as long as the session: without it there is no session to ask about (no 401 noise).
    if (cookie("atg_csrf")) {
      try {
        await signedIn();
        return;
      } catch (exc) {
        app.session = null;
        if (exc instanceof Offline) app.message = "Cannot reach the gateway.";
      }
    }
    render();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot); else boot();
})();
