// The campaigns page: redraws the list (state, progress, counts) from /campaigns/data.
"use strict";

(function () {
  const table = document.getElementById("campaigns");
  if (!table) {
    return;
  }
  const live = document.getElementById("live-status");
  const campaignUrl = table.dataset.campaignUrl;

  function cell(content, numeric) {
    const td = document.createElement("td");
    if (content instanceof Node) {
      td.appendChild(content);
    } else {
      td.textContent = content;
    }
    if (numeric) {
      td.className = "num";
    }
    return td;
  }

  function counts(doc) {
    return Object.keys(doc).map(function (state) { return state + " " + doc[state]; }).join(", ");
  }

  function draw(doc) {
    const rows = doc.items.map(function (c) {
      const tr = document.createElement("tr");
      const a = document.createElement("a");
      a.href = campaignUrl.replace(/\/0$/, "/" + c.id);
      a.textContent = c.id;
      const bar = document.createElement("progress");
      bar.max = 100;
      bar.value = c.percent;
      bar.textContent = c.percent + " %";
      [cell(a), cell(c.model_version), cell(c.state), cell(bar), cell(c.finished, true),
       cell(c.jobs, true), cell(counts(c.counts)), cell(c.created_at)].forEach(function (td) {
        tr.appendChild(td);
      });
      return tr;
    });
    if (rows.length === 0) {
      const tr = document.createElement("tr");
      const td = cell("No campaign yet.");
      td.colSpan = 8;
      tr.appendChild(td);
      rows.push(tr);
    }
    table.tBodies[0].replaceChildren.apply(table.tBodies[0], rows);
  }

  window.tinyfleetPoll(table.dataset.pollUrl, Number(table.dataset.pollMs), draw,
                       function (text) { live.textContent = text; });
})();
