// A campaign's page: state, progress bar, counts by state and batch, each device's outcome
// and the actions its state allows, redrawn from /campaigns/<id>/data.
"use strict";

(function () {
  const root = document.getElementById("campaign");
  if (!root) {
    return;
  }
  const live = document.getElementById("live-status");
  const deviceUrl = root.dataset.deviceUrl;

  const row = window.tinyfleetRow;

  function counts(doc) {
    return Object.keys(doc).map(function (state) { return state + " " + doc[state]; }).join(", ");
  }

  function replace(id, rows) {
    const table = document.getElementById(id);
    if (table) {
      table.tBodies[0].replaceChildren.apply(table.tBodies[0], rows);
    }
  }

  function draw(doc) {
    const c = doc.campaign;
    document.getElementById("campaign-state").textContent = c.state;
    document.getElementById("halt-reason").textContent = c.halt_reason || "";
    document.getElementById("batch").textContent = (c.current_batch + 1) + " of " + c.batch_count;
    document.getElementById("times").textContent = c.created_at + " / " + (c.started_at || "-") +
      " / " + (c.finished_at || "-");
    const bar = document.getElementById("progress");
    bar.value = c.percent;
    bar.textContent = c.percent + " %";
    document.getElementById("progress-text").textContent = c.finished + " of " + c.jobs +
      " jobs finished (" + c.percent + " %)";
    document.querySelectorAll("#actions form[data-action]").forEach(function (form) {
      form.hidden = c.actions.indexOf(form.dataset.action) < 0;
    });
    replace("counts", Object.keys(c.counts).map(function (state) {
      return row([state, c.counts[state]], [1]);
    }));
    replace("batches", c.batches.map(function (b) {
      const name = b.batch < 0 ? "skipped" : (b.batch === 0 ? "canary" : b.batch);
      return row([name, counts(b.counts)]);
    }));
    replace("outcomes", doc.outcomes.map(function (o) {
      const a = document.createElement("a");
      a.href = deviceUrl.replace("KEY", encodeURIComponent(o.device));
      a.textContent = o.name;
      const progress = o.progress === null ? "" : Math.round(o.progress * 100) + " %";
      const tr = row([a, o.mcu, o.batch, o.state, progress, o.reason], [2, 4]);
      tr.dataset.state = o.state;
      tr.lastChild.className = "reason";
      return tr;
    }));
  }

  window.tinyfleetPoll(root.dataset.pollUrl, Number(root.dataset.pollMs), draw,
                       function (text) { live.textContent = text; });
})();
