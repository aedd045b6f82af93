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

  function drawFit(report) {
    const sram = document.getElementById("sram-chart");
    const flash = document.getElementById("flash-chart");
    drawBar(sram, "SRAM", SRAM_PARTS, report.sram, report.sram_bytes,
            "device SRAM " + kb(report.sram_bytes));
    drawBar(flash, "Flash", FLASH_PARTS, report, report.slot_bytes,
            "firmware slot " + kb(report.slot_bytes));
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
      .then(drawFit)
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
})();
