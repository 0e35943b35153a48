// provider-router dashboard: new rows of the request list, live from /ui/events.
// Rows arrive as cells of text; they are placed with textContent only, never as HTML.
"use strict";

(function () {
  const table = document.getElementById("requests");
  if (!table || !table.dataset.live) {
    return;
  }
  const body = table.tBodies[0];
  const badge = document.getElementById("live");
  const MAX_ROWS = 500;

  function cell(c) {
    const td = document.createElement("td");
    if (c.class) {
      td.className = c.class;
    }
    if (c.title) {
      td.title = c.title;
    }
    if (c.href && c.href.startsWith("/ui/")) {
      const a = document.createElement("a");
      a.href = c.href;
      a.textContent = c.text;
      td.appendChild(a);
    } else {
      td.textContent = c.text;
    }
    return td;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    tr.className = "fresh";
    for (const c of cells) {
      tr.appendChild(cell(c));
    }
    return tr;
  }

  function say(text, state) {
    if (badge) {
      badge.textContent = text;
      badge.dataset.state = state;
    }
  }

  const source = new EventSource(table.dataset.live);
  source.addEventListener("open", () => say("live", "open"));
  source.addEventListener("error", () => say("reconnecting", "error"));
  source.addEventListener("rows", (event) => {
    const empty = document.getElementById("empty");
    if (empty) {
      empty.remove();
    }
    for (const cells of JSON.parse(event.data)) {
      body.insertBefore(row(cells), body.firstChild);
    }
    while (body.rows.length > MAX_ROWS) {
      body.deleteRow(-1);
    }
  });
  window.addEventListener("pagehide", () => source.close());
})();
