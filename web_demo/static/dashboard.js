// The training dashboard: the aggregator's recent rounds, as the demo server last saw them, drawn with
// plotly.js and redrawn whenever the demo server has newer ones.
"use strict";

const SERVER_DOWN = "The demo server is not answering. Is it still running?";
const stateLine = document.getElementById("state");
const summaryLine = document.getElementById("summary");
const charts = document.getElementById("charts");
const badge = document.getElementById("model-version");
const details = document.getElementById("round-details");
const PLOT_CONFIG = { responsive: true, displayModeBar: false };

let rounds = []; // oldest first
let shownKey = null; // what the charts show, so an unchanged status is not redrawn
let pollMs = 5000;

function showState(text) {
  stateLine.textContent = text ?? "";
  stateLine.hidden = !text;
}

function layout(title, yTitle, extra = {}) {
  return {
    title: { text: title, font: { size: 14 } },
    margin: { l: 48, r: 12, t: 36, b: 40 },
    // The x axis is the round unless said otherwise: whole rounds only, each one ticked while there are few.
    xaxis: { tickformat: "d", ...(rounds.length <= 12 ? { dtick: 1 } : {}) },
    yaxis: { title: { text: yTitle }, rangemode: "tozero" },
    legend: { orientation: "h", y: -0.15 },
    ...extra,
  };
}

// Rounds recorded by an older aggregator lack some fields: gaps, not zeros.
const series = (field, scale = 1) => rounds.map((r) => (r[field] == null ? null : r[field] * scale));
const roundNumbers = () => rounds.map((r) => r.round);

// The hour (UTC) of the day a round opened at: on the simulated clock when there is one; the wall clock's
// started_at otherwise (clock_started_s then counts from an arbitrary start).
function hourOfDay(r, clock) {
  const seconds = clock === "simulated" ? r.clock_started_s : r.started_at;
  return seconds == null ? null : ((seconds / 3600) % 24 + 24) % 24;
}

function draw(status) {
  const x = roundNumbers();
  const line = (name, y, extra = {}) => ({ type: "scatter", mode: "lines+markers", name, x, y, ...extra });
  const bar = (name, y, color) => ({ type: "bar", name, x, y, marker: { color } });
  Plotly.react("chart-recall", [
    line("top-1", series("recall_at_1", 100)),
    line("top-3", series("recall_at_3", 100)),
  ], layout("Recall by round, scored on phones", "%"), PLOT_CONFIG);
  Plotly.react("chart-participants", [
    bar("reported", series("reported"), "#1a73e8"),
    bar("dropped", series("dropped"), "#d93025"),
    bar("aborted", series("aborted"), "#f9ab00"),
    bar("late", series("late"), "#9aa0a6"),
  ], layout("Participants and drop-outs by round", "phones", { barmode: "stack" }), PLOT_CONFIG);
  Plotly.react("chart-eligible", [{
    type: "scatter", mode: "markers", name: "eligible", x: rounds.map((r) => hourOfDay(r, status.clock)),
    y: series("checked_in"),
    customdata: x, hovertemplate: "round %{customdata}: %{y} phones at %{x:.1f} h<extra></extra>",
  }], layout(`Eligible phones by hour of the ${status.clock === "simulated" ? "simulated " : ""}day`, "phones",
    { xaxis: { title: { text: "hour (UTC)" }, range: [0, 24], dtick: 3 } }), PLOT_CONFIG);
  Plotly.react("chart-bytes", [
    bar("up", series("bytes_up", 1e-6), "#1a73e8"),
    bar("down", series("bytes_down", 1e-6), "#81c995"),
  ], layout("Bytes by round", "MB", { barmode: "group" }), PLOT_CONFIG);
  const privacy = document.getElementById("privacy-figure");
  privacy.hidden = !status.differential_privacy;
  if (status.differential_privacy) {
    Plotly.react("chart-epsilon", [line("epsilon", series("epsilon"))],
      layout("Privacy spent by round (ε at δ)", "ε"), PLOT_CONFIG);
  }
}

function showDetails(round) {
  const r = rounds.find((candidate) => candidate.round === round);
  if (!r) return;
  const values = {
    round: r.round, status: r.status, selected: r.selected, reported: r.reported, dropped: r.dropped ?? "–",
    aborted: r.aborted ?? "–", late: r.late ?? "–",
    duration: r.duration_s === null ? "–" : `${r.duration_s.toFixed(1)} s`, failure: r.failure ?? "none",
  };
  for (const [field, value] of Object.entries(values)) {
    details.querySelector(`[data-field="${field}"]`).textContent = String(value);
  }
  details.hidden = false;
}

function onClick(event) {
  const point = event.points?.[0];
  if (!point) return;
  // The eligibility chart's x is the hour; its points carry their round.
  showDetails(point.customdata ?? point.x);
}

function render(body) {
  const status = body.status;
  if (!status) {
    showState(body.error ? `The aggregator is not reachable: ${body.error}` : `Waiting for the aggregator at ${body.aggregator}…`);
    return;
  }
  badge.textContent = `model v${status.model_version}`;
  badge.classList.remove("missing");
  rounds = [...status.recent_rounds].sort((a, b) => a.round - b.round);
  summaryLine.hidden = false;
  summaryLine.textContent = `Round ${status.round} is open: ${status.reported} of ${status.goal} updates in, ` +
    `${status.selected} phones selected.` + (status.epsilon === null ? "" : ` ε spent: ${status.epsilon.toPrecision(3)}.`);
  if (!rounds.length) {
    charts.hidden = true;
    showState(`No rounds yet: the aggregator at ${body.aggregator} is waiting for phones to report.` +
      (body.error ? ` (Last refresh failed: ${body.error})` : ""));
    return;
  }
  showState(body.error ? `Showing the last rounds seen; the aggregator is not reachable now: ${body.error}` : "");
  const key = JSON.stringify([status.model_version, rounds.length, rounds[rounds.length - 1].round, status.epsilon]);
  charts.hidden = false;
  if (key === shownKey) return;
  shownKey = key;
  draw(status);
  // A chart can be clicked once plotly has drawn it (the privacy chart only with differential privacy on).
  for (const chart of charts.querySelectorAll(".chart")) {
    if (chart.on && !chart.dataset.clickable) {
      chart.on("plotly_click", onClick);
      chart.dataset.clickable = "yes";
    }
  }
}

async function poll() {
  try {
    const response = await fetch("api/training");
    if (!response.ok) throw new Error(`The demo server answered ${response.status}.`);
    const body = await response.json();
    pollMs = body.refresh_seconds * 1000;
    render(body);
  } catch (error) {
    showState(error instanceof TypeError ? SERVER_DOWN : error.message);
  }
  setTimeout(poll, pollMs);
}

if (typeof Plotly === "undefined") showState("The charting library did not load.");
else poll();
