// The fleet page: redraws the devices table and the counts from /fleet/data.
"use strict";

(function () {
  const table = document.getElementById("devices");
  if (!table) {
    return;
  }
  const deviceUrl = table.dataset.deviceUrl;
  const live = document.getElementById("live-status");

  function cell(text, numeric) {
    const td = document.createElement("td");
    td.textContent = text;
    if (numeric) {
      td.className = "num";
    }
    return td;
  }

  function drawRows(doc) {
    const body = table.tBodies[0];
    const rows = doc.items.map(function (item) {
      const tr = document.createElement("tr");
      doc.columns.forEach(function (column) {
        if (column.key === "name") {
          const td = document.createElement("td");
          const a = document.createElement("a");
          a.href = deviceUrl.replace("KEY", encodeURIComponent(item.id));
          a.textContent = item.name;
          td.appendChild(a);
          tr.appendChild(td);
        } else {
          tr.appendChild(cell(item[column.key], column.numeric));
        }
      });
      return tr;
    });
    if (rows.length === 0) {
      const tr = document.createElement("tr");
      const td = cell("No device matches.", false);
      td.colSpan = doc.columns.length;
      tr.appendChild(td);
      rows.push(tr);
    }
    body.replaceChildren.apply(body, rows);
    const next = document.getElementById("next-page");
    if (next && doc.next_cursor) {
      const url = new URL(window.location.href);
      url.searchParams.set("cursor", doc.next_cursor);
      next.href = url.pathname + url.search;
      next.hidden = false;
    } else if (next) {
      next.hidden = true;
    }
  }

  function drawCounts(doc) {
    const counts = document.getElementById("counts");
    if (!counts) {
      return;
    }
    const rows = doc.counts.map(function (count) {
      const tr = document.createElement("tr");
      tr.appendChild(cell(count.mcu, false));
      doc.states.forEach(function (state) {
        tr.appendChild(cell(count.by_state[state], true));
      });
      tr.appendChild(cell(count.total, true));
      return tr;
    });
    if (rows.length === 0) {
      const tr = document.createElement("tr");
      const td = cell("No devices registered.", false);
      td.colSpan = doc.states.length + 2;
      tr.appendChild(td);
      rows.push(tr);
    }
    counts.tBodies[0].replaceChildren.apply(counts.tBodies[0], rows);
  }

  window.tinyfleetPoll(table.dataset.pollUrl, Number(table.dataset.pollMs), function (doc) {
    drawRows(doc);
    drawCounts(doc);
  }, function (text) {
    live.textContent = text;
  });
})();
