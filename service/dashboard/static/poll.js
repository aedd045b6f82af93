// Polls a JSON URL every `ms` milliseconds with the last ETag (If-None-Match): the server
// answers 304 while nothing changed. Stops while the tab is hidden; a 401 (the session
// ended) goes to the login page.
"use strict";

window.tinyfleetPoll = function (url, ms, onData, onStatus) {
  let etag = null;
  let timer = null;
  const status = onStatus || function () {};

  async function tick() {
    timer = null;
    if (document.hidden) {
      return;
    }
    const headers = { "Accept": "application/json" };
    if (etag) {
      headers["If-None-Match"] = etag;
    }
    try {
      const response = await fetch(url, { headers: headers, cache: "no-store",
                                           credentials: "same-origin" });
      if (response.status === 401) {
        window.location.assign("/login?next=" +
          encodeURIComponent(window.location.pathname + window.location.search));
        return;
      }
      if (response.status === 200) {
        etag = response.headers.get("ETag");
        onData(await response.json());
        status("updated " + new Date().toLocaleTimeString());
      } else if (response.status === 304) {
        status("up to date " + new Date().toLocaleTimeString());
      } else {
        status("server answered " + response.status);
      }
    } catch (err) {
      status("no answer from the server: " + err);
    }
    schedule();
  }

  function schedule() {
    if (timer === null && !document.hidden) {
      timer = window.setTimeout(tick, ms);
    }
  }

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) {
      schedule();
    }
  });
  schedule();
};

// A table row of `values` (text, or a Node put in as it is); the cells whose index is in
// `numeric` get class "num" (right-aligned figures).
window.tinyfleetRow = function (values, numeric) {
  const tr = document.createElement("tr");
  values.forEach(function (value, i) {
    const td = document.createElement("td");
    if (value instanceof Node) {
      td.appendChild(value);
    } else {
      td.textContent = value === null || value === undefined ? "" : value;
    }
    if (numeric && numeric.indexOf(i) >= 0) {
      td.className = "num";
    }
    tr.appendChild(td);
  });
  return tr;
};
