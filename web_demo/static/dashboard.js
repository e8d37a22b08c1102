// The training dashboard: the aggregator's recent rounds, as the demo server last saw them, and what the run's
// folder adds (loss, central evaluation, reference models), drawn with plotly.js and redrawn when either changes.
"use strict";

const SERVER_DOWN = "The demo server is not answering. Is it still running?";
const stateLine = document.getElementById("state");
const summaryLine = document.getElementById("summary");
const charts = document.getElementById("charts");
const badge = document.getElementById("model-version");
const details = document.getElementById("round-details");
const PLOT_CONFIG = { responsive: true, displayModeBar: false };
const TOP = { 1: "#1a73e8", 3: "#e37400" }; // one colour per metric, whoever scored it

let rounds = []; // the aggregator's, oldest first
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
    xaxis: { title: { text: "round" }, tickformat: "d", ...(rounds.length <= 12 ? { dtick: 1 } : {}) },
    yaxis: { title: { text: yTitle }, rangemode: "tozero" },
    legend: { orientation: "h", y: -0.15 },
    ...extra,
  };
}

// Rounds recorded by an older aggregator lack some fields: gaps, not zeros.
const series = (field, scale = 1) => rounds.map((r) => (r[field] == null ? null : r[field] * scale));
const roundNumbers = () => rounds.map((r) => r.round);

// Which clock timed a round. Its record has its wall-clock opening and closing (started_at, closed_at), and its
// opening and duration on the aggregator's clock (clock_started_s, duration_s), which is simulated time on a
// simulated clock; it does not say which clock that was, and the aggregator's clock now says nothing of rounds
// recorded before it was restarted on another. On the wall clock the duration is the time between the wall-clock
// opening and closing (to within clock drift); a simulation passes through simulated time far faster.
function roundClock(r) {
  if (r.duration_s == null) return null;
  const wall = r.closed_at - r.started_at;
  return Math.abs(r.duration_s - wall) <= 0.05 + 1e-3 * wall ? "wall" : "simulated";
}

// The hour (UTC) of the day a round opened at, on the clock that timed it: simulated time starts at midnight.
function hourOfDay(r) {
  const clock = roundClock(r);
  const seconds = clock === "wall" ? r.started_at : clock === "simulated" ? r.clock_started_s : null;
  return seconds == null ? null : ((seconds / 3600) % 24 + 24) % 24;
}

// A horizontal line across the rounds drawn, at a reference model's recall.
function reference(name, row, metric, dash, xs) {
  return {
    type: "scatter", mode: "lines", name: `${name} top-${metric}`, x: [Math.min(...xs), Math.max(...xs)],
    y: [100 * row[`recall_at_${metric}`], 100 * row[`recall_at_${metric}`]],
    line: { color: TOP[metric], dash, width: 1.5 }, hovertemplate: `${row.model}: %{y:.2f}%<extra></extra>`,
  };
}

function drawRecall(run) {
  const x = roundNumbers();
  // The central score of the model a run's round made is plotted at the next round, which starts from that model:
  // the phones' score there is of the same model.
  const central = run.rounds.filter((r) => r.recall_at_1 != null);
  const centralX = central.map((r) => r.round + 1);
  const traces = [1, 3].flatMap((metric) => [
    { type: "scatter", mode: "lines+markers", name: `top-${metric} on phones`, x,
      y: series(`recall_at_${metric}`, 100), line: { color: TOP[metric] }, customdata: series("eval_devices"),
      hovertemplate: "round %{x}: %{y:.2f}%, scored by %{customdata} phones<extra></extra>" },
    ...(central.length ? [{
      type: "scatter", mode: "markers", name: `top-${metric} central`, x: centralX,
      y: central.map((r) => 100 * r[`recall_at_${metric}`]),
      marker: { color: TOP[metric], symbol: "diamond-open", size: 9 },
      text: central.map((r) => `model v${r.model_version}`), hovertemplate: "%{text}: %{y:.2f}%<extra></extra>",
    }] : []),
  ]);
  const xs = [...x, ...centralX];
  // The model the run ended with, scored on every phone's held-out messages, after its last round.
  if (run.final && xs.length) {
    const after = Math.max(...xs);
    traces.push(...[1, 3].map((metric) => ({
      type: "scatter", mode: "markers", name: `top-${metric} final, every phone`, x: [after],
      y: [100 * run.final[`recall_at_${metric}`]], marker: { color: TOP[metric], symbol: "star", size: 12 },
      hovertemplate: `model v${run.final.model_version} on every phone: %{y:.2f}%<extra></extra>`,
    })));
  }
  for (const [name, row, dash] of [["n-gram", run.n_gram, "dash"], ["oracle", run.oracle, "dot"]]) {
    if (row) traces.push(reference(name, row, 1, dash, xs), reference(name, row, 3, dash, xs));
  }
  Plotly.react("chart-recall", traces, layout("Recall of the model each round starts from", "%"), PLOT_CONFIG);
}

function drawLoss(run) {
  const trained = run.rounds.filter((r) => r.train_loss != null);
  const figure = document.getElementById("loss-figure");
  figure.hidden = !trained.length;
  if (!trained.length) return;
  Plotly.react("chart-loss", [{
    type: "scatter", mode: "lines+markers", name: "loss", x: trained.map((r) => r.round),
    y: trained.map((r) => r.train_loss), line: { color: "#9334e6" },
  }], layout("Training loss by round (the reporting phones' mean)", "cross-entropy",
    // Zero is no loss a model reaches: the axis fits the curve, so that its fall shows.
    { yaxis: { title: { text: "cross-entropy" } } }), PLOT_CONFIG);
}

// The aggregator sees the phones that ask to train, which only eligible phones do, but not every eligible phone
// asks while a round is open (the aggregator spreads their check-ins); the simulation knows how many were eligible.
function drawAsking(run) {
  const hours = rounds.map(hourOfDay);
  const eligible = run.rounds.filter((r) => r.round > 0 && r.eligible != null && r.sim_hour_utc != null);
  const clocks = new Set([...rounds.map(roundClock).filter((c) => c), ...(eligible.length ? ["simulated"] : [])]);
  const hour = clocks.size === 1 && clocks.has("simulated") ? "simulated hour (UTC)"
    : clocks.has("simulated") ? "hour (UTC; simulated or wall)" : "hour (UTC)";
  const hover = "round %{customdata}: %{y} phones at %{x:.1f} h<extra></extra>";
  Plotly.react("chart-asking", [
    { type: "scatter", mode: "markers", name: "asked to train", x: hours, y: series("checked_in"),
      customdata: roundNumbers(), hovertemplate: hover, marker: { color: "#1a73e8" } },
    ...(eligible.length ? [{
      type: "scatter", mode: "markers", name: "eligible at the round's start", x: eligible.map((r) => r.sim_hour_utc),
      y: eligible.map((r) => r.eligible), customdata: eligible.map((r) => r.round), hovertemplate: hover,
      marker: { color: "#81c995", symbol: "circle-open" },
    }] : []),
  ], layout(`Phones asking to train by ${hour}`, "phones",
    { xaxis: { title: { text: hour }, range: [0, 24], dtick: 3 } }), PLOT_CONFIG);
}

function draw(status, run) {
  const x = roundNumbers();
  const line = (name, y, extra = {}) => ({ type: "scatter", mode: "lines+markers", name, x, y, ...extra });
  const bar = (name, y, color) => ({ type: "bar", name, x, y, marker: { color } });
  drawRecall(run);
  drawLoss(run);
  Plotly.react("chart-participants", [
    bar("reported", series("reported"), "#1a73e8"),
    bar("dropped", series("dropped"), "#d93025"),
    bar("aborted", series("aborted"), "#f9ab00"),
    bar("late", series("late"), "#9aa0a6"),
  ], layout("Participants and drop-outs by round", "phones", { barmode: "stack" }), PLOT_CONFIG);
  drawAsking(run);
  Plotly.react("chart-bytes", [
    bar("up", series("bytes_up", 1e-6), "#1a73e8"),
    bar("down", series("bytes_down", 1e-6), "#81c995"),
  ], layout("Bytes by round", "MB", { barmode: "group" }), PLOT_CONFIG);
  const privacy = document.getElementById("privacy-figure");
  const audited = series("audit_epsilon").some((value) => value != null);
  privacy.hidden = !status.differential_privacy && !audited;
  if (!privacy.hidden) drawPrivacy(line, audited);
  drawPersonal(bar);
  // Word discovery's rounds: the prefixes that reached the threshold and the words that joined the vocabulary, as
  // counts (the words themselves are the tokenizer's). Not how many voted: a count below the threshold, which
  // discovery's privacy accounting does not cover, so the aggregator does not record it.
  const words = document.getElementById("words-figure");
  words.hidden = !rounds.some((r) => r.round_kind === "discovery");
  if (!words.hidden) {
    Plotly.react("chart-words", [
      bar("prefixes added", series("discovery_prefixes_added"), "#81c995"),
      bar("words discovered", series("words_discovered"), "#188038"),
    ], layout("Word discovery by round", "prefixes / words", { barmode: "group" }),
    PLOT_CONFIG);
  }
}

// Personal models' federated evaluation (Wang et al. 2019): of the phones that scored their personal model beside
// the global one, the shares it helped and hurt at top-1, and the median gain; the aggregator keeps no phone's own.
function drawPersonal(bar) {
  const figure = document.getElementById("personal-figure");
  figure.hidden = !rounds.some((r) => r.personal_devices);
  if (figure.hidden) return;
  Plotly.react("chart-personal", [
    bar("phones helped", series("personal_helped", 100), "#188038"),
    bar("phones hurt", series("personal_hurt", 100), "#d93025"),
    { type: "scatter", mode: "lines+markers", name: "median gain (points)", x: roundNumbers(),
      y: series("personal_median_gain"), yaxis: "y2", line: { color: "#9334e6" } },
  ], layout("Personal models against the global one, by round", "% of the phones that scored both", {
    barmode: "group",
    yaxis2: { title: { text: "points of top-1" }, overlaying: "y", side: "right" },
    margin: { l: 48, r: 48, t: 36, b: 40 },
  }), PLOT_CONFIG);
}

// The canary clients' audits (every few rounds): the empirical ε with its interval, and the lower bound, beside
// the accountant's ε, which bounds every attack where they measure one.
function auditTraces() {
  const x = roundNumbers();
  const above = rounds.map((r) => (r.audit_epsilon == null ? null : r.audit_epsilon_high - r.audit_epsilon));
  const below = rounds.map((r) => (r.audit_epsilon == null ? null : r.audit_epsilon - r.audit_epsilon_low));
  return [
    { type: "scatter", mode: "markers", name: "empirical ε (canary clients, 95% interval)", x,
      y: series("audit_epsilon"), marker: { color: "#e37400", size: 8 },
      error_y: { type: "data", symmetric: false, array: above, arrayminus: below, color: "#e37400" } },
    { type: "scatter", mode: "markers", name: "its 95% lower bound", x, y: series("audit_epsilon_lower_bound"),
      marker: { color: "#d93025", symbol: "triangle-up", size: 8 } },
  ];
}

// DP-FTRL's rounds also carry the ρ-zCDP spent (DP-FedAvg's do not), drawn on an axis of its own: ε and ρ are
// orders of magnitude apart.
function drawPrivacy(line, audited) {
  const epsilon = series("epsilon");
  const proven = epsilon.some((value) => value != null);
  const rho = series("rho");
  const zcdp = rho.some((value) => value != null);
  const traces = [
    ...(proven ? [line("epsilon", epsilon)] : []),
    ...(zcdp ? [line("ρ-zCDP", rho, { yaxis: "y2" })] : []),
    ...(audited ? auditTraces() : []),
  ];
  const spent = zcdp ? "Privacy spent by round (ε at δ, and ρ-zCDP)" : "Privacy spent by round (ε at δ)";
  const title = proven || !audited ? spent : "Empirical privacy by round (no DP: no proven ε)";
  const rhoAxis = {
    yaxis2: { title: { text: "ρ" }, overlaying: "y", side: "right", rangemode: "tozero" },
    margin: { l: 48, r: 48, t: 36, b: 40 },
  };
  Plotly.react("chart-epsilon", traces, layout(title, "ε", zcdp ? rhoAxis : {}), PLOT_CONFIG);
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
  // The x of the chart of phones asking to train is the hour; its points carry their round.
  showDetails(point.customdata ?? point.x);
}

function ago(epochSeconds) {
  const seconds = Math.max(0, Date.now() / 1000 - epochSeconds);
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 90 * 60) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 48 * 3600) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} days ago`;
}

// What is going on now. Only the run's folder knows that its training has ended: the aggregator keeps a round open
// for phones that may still come. Without it, a round no phone has joined says since when nothing has happened.
function describeProgress(status, run) {
  const last = rounds[rounds.length - 1];
  const open = status.selected
    ? `Round ${status.round} is open: ${status.reported} of ${status.goal} updates in, ` +
      `${status.selected} phones selected.`
    : `Round ${status.round} is open: no phone has joined it` +
      (last ? ` since round ${last.round} closed ${ago(last.closed_at)}.` : " yet.");
  const zcdp = status.rho == null ? "" : `, ρ-zCDP ${status.rho.toPrecision(3)}`;
  const audit = status.audit_epsilon == null ? "" : ` Empirical ε (canary clients): ` +
    `${status.audit_epsilon.toPrecision(3)} (${status.audit_epsilon_low.toPrecision(3)}–` +
    `${status.audit_epsilon_high.toPrecision(3)}).`;
  const discovery = status.words_discovered == null ? "" : ` Words discovered: ${status.words_discovered}` +
    (status.discovery_epsilon == null ? "." : ` (discovery's ε: ${status.discovery_epsilon.toPrecision(3)}).`);
  const privacy = (status.epsilon === null ? "" : ` ε spent: ${status.epsilon.toPrecision(3)}${zcdp}.`) + audit +
    discovery;
  if (!run.finished) return open + privacy;
  const final = run.rounds[run.rounds.length - 1];
  const ran = final?.round ?? last?.round ?? 0;
  const version = final?.model_version ?? status.model_version;
  const percent = (row) => `${(100 * row.recall_at_1).toFixed(2)}%`;
  const score = !run.final ? "" : ` On every phone's held-out messages it suggests the next word first ` +
    `${percent(run.final)} of the time` + (run.n_gram ? ` (the n-gram: ${percent(run.n_gram)}).` : ".");
  const finished = `Training finished after ${ran} round${ran === 1 ? "" : "s"}, with model v${version}.${score}`;
  // Phones outside the simulation (this browser, for one) may go on training after it ended.
  return finished + (status.round - 1 > ran ? ` ${open}` : "") + privacy;
}

function render(body, run) {
  const status = body.status;
  if (!status) {
    showState(body.error ? `The aggregator is not reachable: ${body.error}` : `Waiting for the aggregator at ${body.aggregator}…`);
    return;
  }
  badge.textContent = `model v${status.model_version}`;
  badge.classList.remove("missing");
  rounds = [...status.recent_rounds].sort((a, b) => a.round - b.round);
  summaryLine.hidden = false;
  summaryLine.textContent = describeProgress(status, run);
  if (!rounds.length) {
    charts.hidden = true;
    showState(`No rounds yet: the aggregator at ${body.aggregator} is waiting for phones to report.` +
      (body.error ? ` (Last refresh failed: ${body.error})` : ""));
    return;
  }
  showState(body.error ? `Showing the last rounds seen; the aggregator is not reachable now: ${body.error}` : "");
  // Everything drawn: a round's record can change after it closed (an upload that arrives late).
  const key = JSON.stringify([rounds, status.differential_privacy, run]);
  charts.hidden = false;
  if (key === shownKey) return;
  shownKey = key;
  draw(status, run);
  // A chart can be clicked once plotly has drawn it (the privacy chart only with differential privacy on).
  for (const chart of charts.querySelectorAll(".chart")) {
    if (chart.on && !chart.dataset.clickable) {
      chart.on("plotly_click", onClick);
      chart.dataset.clickable = "yes";
    }
  }
}

async function getJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`The demo server answered ${response.status}.`);
  return response.json();
}

async function poll() {
  try {
    const [body, run] = await Promise.all([getJson("api/training"), getJson("api/run")]);
    pollMs = body.refresh_seconds * 1000;
    render(body, run);
  } catch (error) {
    showState(error instanceof TypeError ? SERVER_DOWN : error.message);
  }
  setTimeout(poll, pollMs);
}

if (typeof Plotly === "undefined") showState("The charting library did not load.");
else poll();
