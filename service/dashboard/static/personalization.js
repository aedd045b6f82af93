// The personalization page: the summary table, the mean gain per round (min..max as error
// bars) and the distribution of gains in the latest round, per MCU class and model version,
// drawn with plotly.js from /personalization/data.
"use strict";

(function () {
  const root = document.getElementById("personalization");
  if (!root || !window.Plotly) {
    return;
  }
  const live = document.getElementById("live-status");
  const CONFIG = { displayModeBar: false, responsive: true };

  function pct(x) {
    return (x * 100).toFixed(1) + " %";
  }

  function key(r) {
    return r.mcu + " / " + (r.model_version || "unknown");
  }

  function drawTable(groups) {
    const body = document.getElementById("groups").tBodies[0];
    const rows = groups.map(function (g) {
      const tr = document.createElement("tr");
      [g.mcu, g.model_version || "unknown", g.devices, g.rounds, pct(g.mean_accuracy_before),
       pct(g.mean_accuracy_after), pct(g.mean_gain), g.rolled_back,
       (g.max_training_memory_bytes / 1024).toFixed(1) + " kB"].forEach(function (v, i) {
        const td = document.createElement("td");
        td.textContent = v;
        if (i >= 2) {
          td.className = "num";
        }
        tr.appendChild(td);
      });
      return tr;
    });
    if (rows.length === 0) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = 9;
      td.textContent = "No device has reported a personalization round yet.";
      tr.appendChild(td);
      rows.push(tr);
    }
    body.replaceChildren.apply(body, rows);
  }

  function drawCharts(doc) {
    const series = {};
    doc.rounds.forEach(function (r) {
      (series[key(r)] = series[key(r)] || []).push(r);
    });
    const names = Object.keys(series).sort();
    const gain = names.map(function (name) {
      const rs = series[name];
      return {
        type: "scatter", mode: "lines+markers", name: name,
        x: rs.map(function (r) { return r.round; }),
        y: rs.map(function (r) { return r.mean_gain * 100; }),
        customdata: rs.map(function (r) { return r.devices; }),
        error_y: { type: "data", symmetric: false,
                   array: rs.map(function (r) { return (r.max_gain - r.mean_gain) * 100; }),
                   arrayminus: rs.map(function (r) { return (r.mean_gain - r.min_gain) * 100; }) },
        hovertemplate: name + ", round %{x}: %{y:.1f} points over %{customdata} devices<extra></extra>",
      };
    });
    window.Plotly.react("gain-chart", gain, {
      height: 300, margin: { l: 60, r: 20, t: 40, b: 50 },
      title: { text: "Mean accuracy gain per round (bars: min to max)", font: { size: 14 } },
      xaxis: { title: { text: "round" }, dtick: 1 },
      yaxis: { title: { text: "percentage points" }, zeroline: true },
    }, CONFIG);
    const distribution = names.map(function (name) {
      const rs = series[name];
      const last = rs[rs.length - 1];
      const edges = Object.keys(last.bins).map(Number).sort(function (a, b) { return a - b; });
      return {
        type: "bar", name: name + " (round " + last.round + ")",
        x: edges.map(function (e) { return (e + doc.bin_width / 2) * 100; }),
        y: edges.map(function (e) { return last.bins[e.toFixed(2)]; }),
        width: doc.bin_width * 100 * 0.9,
        hovertemplate: "%{x:.0f} points: %{y} devices<extra></extra>",
      };
    });
    window.Plotly.react("distribution-chart", distribution, {
      height: 300, barmode: "group", margin: { l: 60, r: 20, t: 40, b: 50 },
      title: { text: "Distribution of the gain in each group's latest round", font: { size: 14 } },
      xaxis: { title: { text: "accuracy gain, percentage points (bins of " +
                              (doc.bin_width * 100).toFixed(0) + ")" } },
      yaxis: { title: { text: "devices" } },
    }, CONFIG);
  }

  function draw(doc) {
    drawTable(doc.groups);
    drawCharts(doc);
  }

  fetch(root.dataset.pollUrl, { credentials: "same-origin", headers: { "Accept": "application/json" } })
    .then(function (response) { return response.json(); })
    .then(draw)
    .catch(function (err) { live.textContent = "The charts could not be drawn: " + err.message; });
  window.tinyfleetPoll(root.dataset.pollUrl, Number(root.dataset.pollMs), draw,
                       function (text) { live.textContent = text; });
})();
