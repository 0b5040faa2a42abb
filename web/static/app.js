// Charts (plotly.js, served from the plotly package) and live updates (server-sent events).
// The server says when the data changed (a `version` event after each landed build or ended
// run, a `tick` now and then); the page then fetches its own fresh contents (X-Partial) and
// swaps them in, without a reload. No viewer polls ClickHouse.
(function () {
  "use strict";
  const live = document.getElementById("live");
  const statusEl = document.getElementById("live-status");
  let version = live ? live.dataset.version : "";
  let busy = false;
  let again = false;

  function renderCharts(root) {
    if (!window.Plotly) return;
    root.querySelectorAll("script.chart-spec").forEach(function (node) {
      const target = document.getElementById(node.dataset.target);
      if (!target) return;
      try {
        const spec = JSON.parse(node.textContent);
        window.Plotly.react(target, spec.data, spec.layout, {
          responsive: true, displayModeBar: false, displaylogo: false,
        });
      } catch (err) {
        target.textContent = "This chart could not be drawn: " + err;
      }
    });
  }

  function say(text, state) {
    if (!statusEl) return;
    statusEl.textContent = text;
    statusEl.dataset.state = state;
  }

  function clock() {
    return new Date().toISOString().slice(11, 19) + " UTC";
  }

  async function refresh() {
    if (!live) return;
    if (busy) { again = true; return; }
    // Never pull the page from under someone typing in it: wait until they leave the field.
    const active = document.activeElement;
    if (active && live.contains(active) && (active.tagName === "INPUT" || active.tagName === "SELECT")) {
      active.addEventListener("blur", function () { refresh(); }, { once: true });
      return;
    }
    busy = true;
    try {
      const response = await fetch(window.location.href, {
        headers: { "X-Partial": "1" }, cache: "no-store", credentials: "same-origin",
      });
      if (response.ok || response.status === 404) {
        const focusedId = active && live.contains(active) ? active.id : "";
        const openDetails = Array.from(live.querySelectorAll("details[open] summary")).map(function (s) { return s.textContent; });
        live.innerHTML = await response.text();
        live.querySelectorAll("details summary").forEach(function (s) {
          if (openDetails.indexOf(s.textContent) >= 0) s.parentElement.open = true;
        });
        version = response.headers.get("X-Versions") || version;
        live.dataset.version = version;
        renderCharts(live);
        if (focusedId) { const el = document.getElementById(focusedId); if (el) el.focus(); }
        say("Live: updated " + clock(), "live");
        document.dispatchEvent(new CustomEvent("dashboard:updated", { detail: { version: version } }));
      }
    } catch (err) {
      say("Live updates: could not refresh (" + err + ")", "down");
    } finally {
      busy = false;
      if (again) { again = false; refresh(); }
    }
  }

  function connect() {
    if (!window.EventSource || !live) return;
    const source = new EventSource("/events");
    source.addEventListener("open", function () { say("Live: connected " + clock(), "live"); });
    source.addEventListener("version", function (event) {
      const v = JSON.parse(event.data);
      if (v.data + "r" + v.runs !== version) refresh();
    });
    source.addEventListener("tick", function () { refresh(); });
    source.addEventListener("error", function () {
      say("Live updates: reconnecting…", "down");
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    renderCharts(document);
    connect();
  });
})();
