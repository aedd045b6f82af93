// The device page: its facts, polled; how the chosen model fits, drawn with plotly.js (served
// from the installed plotly package) from the page's memory report (/devices/<id>/fit).
"use strict";

(function () {
  const KIB = 1024;
  const SRAM_PARTS = [
    ["arena_bytes", "arena", "#4c78a8"],
    ["scratch_bytes", "scratch", "#72b7b2"],
    ["static_bytes", "static", "#54a24b"],
    ["stack_bytes", "stack", "#eeca3b"],
    ["training_bytes", "training", "#e45756"],
  ];
  const FLASH_PARTS = [
    ["weights_bytes", "weights", "#4c78a8"],
    ["code_bytes", "code", "#f58518"],
  ];

  function kb(n) {
    return (n / KIB).toLocaleString(undefined, { minimumFractionDigits: 1,
                                                 maximumFractionDigits: 1 }) + " kB";
  }

  // One horizontal bar of stacked parts against a budget line.
  function drawBar(element, title, parts, values, budget, budgetName) {
    const traces = parts.map(function (part) {
      const bytes = values[part[0]] || 0;
      return {
        type: "bar", orientation: "h", name: part[1], y: [title], x: [bytes / KIB],
        marker: { color: part[2] }, customdata: [bytes],
        hovertemplate: part[1] + ": %{x:,.1f} kB (%{customdata:,} bytes)<extra></extra>",
      };
    });
    const used = parts.reduce(function (sum, part) { return sum + (values[part[0]] || 0); }, 0);
    const layout = {
      barmode: "stack", height: 170, margin: { l: 80, r: 20, t: 30, b: 40 },
      title: { text: title + ": " + kb(used) + " of " + kb(budget), font: { size: 14 } },
      xaxis: { title: { text: "kB" }, range: [0, Math.max(used, budget) * 1.05 / KIB] },
      legend: { orientation: "h", y: -0.45, traceorder: "normal" },
      shapes: [{ type: "line", x0: budget / KIB, x1: budget / KIB, yref: "paper", y0: 0,
                 y1: 1, line: { color: "#222", width: 2, dash: "dash" } }],
      annotations: [{ x: budget / KIB, yref: "paper", y: 1.08, text: budgetName,
                      xanchor: "right", showarrow: false, font: { size: 11 } }],
    };
    window.Plotly.newPlot(element, traces, layout, { displayModeBar: false, responsive: true });
  }

  function drawFit(report, sramId, flashId) {
    const sram = document.getElementById(sramId || "sram-chart");
    const flash = document.getElementById(flashId || "flash-chart");
    drawBar(sram, "SRAM", SRAM_PARTS, report.sram, report.sram_bytes,
            "device SRAM " + kb(report.sram_bytes));
    drawBar(flash, "Flash", FLASH_PARTS, report, report.slot_bytes,
            "firmware slot " + kb(report.slot_bytes));
  }

  // The installed build's memory report (the search pick's, stored by its campaign).
  const installed = document.getElementById("installed-charts");
  if (installed && window.Plotly) {
    drawFit(JSON.parse(installed.dataset.report), "installed-sram-chart",
            "installed-flash-chart");
  }

  const charts = document.getElementById("fit-charts");
  if (charts && window.Plotly) {
    fetch(charts.dataset.fitUrl, { credentials: "same-origin",
                                   headers: { "Accept": "application/json" } })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("the server answered " + response.status);
        }
        return response.json();
      })
      .then(function (report) { drawFit(report); })
      .catch(function (err) {
        charts.textContent = "The charts could not be drawn: " + err.message;
      });
  }

  const facts = document.getElementById("facts");
  const live = document.getElementById("live-status");
  if (facts) {
    window.tinyfleetPoll(facts.dataset.pollUrl, Number(facts.dataset.pollMs), function (doc) {
      facts.querySelectorAll("dd[data-key]").forEach(function (dd) {
        const value = doc[dd.dataset.key];
        if (value === undefined) {
          return;
        }
        if (dd.dataset.key === "slot_bytes") {
          dd.textContent = kb(value) + " (" + doc.ota_layout + " layout)";
        } else if (dd.dataset.format === "kb") {
          dd.textContent = kb(value);
        } else if (Array.isArray(value)) {
          dd.textContent = value.join(" ");
        } else {
          dd.textContent = value;
        }
      });
    }, function (text) {
      live.textContent = text;
    });
  }
  // Update history and personalization rounds (metrics only), polled.
  const history = document.getElementById("history");

  function tableRows(id, rows, empty, columns) {
    const body = document.getElementById(id).tBodies[0];
    const trs = rows.map(function (values) { return window.tinyfleetRow(values, columns); });
    if (trs.length === 0) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = document.getElementById(id).tHead.rows[0].cells.length;
      td.textContent = empty;
      tr.appendChild(td);
      trs.push(tr);
    }
    body.replaceChildren.apply(body, trs);
  }

  function pct(x) {
    return (x * 100).toFixed(1) + " %";
  }

  function drawHistory(doc) {
    const rounds = doc.personalization;
    tableRows("rounds", rounds.map(function (r) {
      return [r.round, r.model_version || "", r.samples_used, pct(r.accuracy_before),
              pct(r.accuracy_after), r.loss_before.toFixed(3), r.loss_after.toFixed(3),
              kb(r.training_memory_bytes), r.kept ? "yes" : "no (rolled back)"];
    }), "No round reported yet.", [0, 2, 3, 4, 5, 6, 7]);
    const campaignUrl = history.dataset.campaignUrl;
    tableRows("jobs", doc.jobs.map(function (j) {
      const a = document.createElement("a");
      a.href = campaignUrl.replace(/\/0$/, "/" + j.campaign);
      a.textContent = "campaign " + j.campaign;
      return [a, j.model_version, j.state, j.reason, j.at];
    }), "No campaign has included this device.", []);
    if (!window.Plotly) {
      return;
    }
    const x = rounds.map(function (r) { return r.round; });
    const traces = [
      { type: "scatter", mode: "lines+markers", name: "accuracy before", x: x,
        y: rounds.map(function (r) { return r.accuracy_before * 100; }) },
      { type: "scatter", mode: "lines+markers", name: "accuracy after", x: x,
        y: rounds.map(function (r) { return r.accuracy_after * 100; }) },
      { type: "scatter", mode: "lines+markers", name: "loss after", x: x, yaxis: "y2",
        y: rounds.map(function (r) { return r.loss_after; }), line: { dash: "dot" } },
    ];
    window.Plotly.react("personalization-chart", traces, {
      height: 280, margin: { l: 60, r: 60, t: 40, b: 50 },
      title: { text: "Accuracy before and after each round", font: { size: 14 } },
      xaxis: { title: { text: "round" }, dtick: 1 },
      yaxis: { title: { text: "accuracy, %" }, range: [0, 100] },
      yaxis2: { title: { text: "loss" }, overlaying: "y", side: "right", rangemode: "tozero" },
      legend: { orientation: "h", y: -0.3 },
    }, { displayModeBar: false, responsive: true });
  }

  if (history) {
    window.tinyfleetPoll(history.dataset.historyUrl, Number(history.dataset.pollMs),
                         drawHistory, function () {});
    fetch(history.dataset.historyUrl, { credentials: "same-origin",
                                        headers: { "Accept": "application/json" } })
      .then(function (response) { return response.json(); })
      .then(drawHistory)
      .catch(function () {});
  }
})();
