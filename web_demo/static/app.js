// The suggestion strip: three words for the text before the caret, asked of the demo server
// whenever that text changes, and refreshed when the aggregator publishes a new model.
"use strict";

// The server's limit on the text it reads.
const CONTEXT_CHARS = 1000;
// The word being typed, split the way the tokenizer splits words: letters and digits with
// inner apostrophes. Empty after a space or punctuation, where the server predicts the next word.
const PARTIAL_WORD = /[\p{L}\p{N}_]+(?:'[\p{L}\p{N}_]+)*$/u;
const REST_OF_WORD = /^[\p{L}\p{N}_']+/u;
const SERVER_DOWN = "The demo server is not answering. Is it still running?";
// Which button shows the best, second and third word: Gboard's order, best in the middle.
const SLOT_OF_RANK = [1, 0, 2];

const message = document.getElementById("message");
const strip = document.getElementById("suggestions");
const buttons = [...strip.querySelectorAll("button")];
const badge = document.getElementById("model-version");
const privacyBadge = document.getElementById("privacy");
const statusLine = document.getElementById("status");
const aggregatorLabel = document.getElementById("aggregator");
const personalChoice = document.getElementById("phone-personal");
const personalLine = document.getElementById("personal-line");

let latestRequest = 0; // an answer to an older request is for text that has changed since: dropped
let requestedContext = null; // the text before the caret that the strip shows, or awaits, words for
let requestedPersonal = false; // and whether from the personal model
let knownVersion = null;
let pollMs = 5000;

// [HTTP status, JSON body]; status 0 when the demo server could not be reached at all.
async function getJson(url) {
  try {
    const response = await fetch(url);
    return [response.status, await response.json().catch(() => ({}))];
  } catch {
    return [0, {}];
  }
}

function showWords(words, note) {
  SLOT_OF_RANK.forEach((slot, rank) => {
    const button = buttons[slot];
    button.textContent = words[rank] ?? "";
    button.disabled = !words[rank];
    button.dataset.rank = rank;
  });
  strip.setAttribute("aria-busy", "false");
  if (note) strip.dataset.note = note;
  else delete strip.dataset.note;
}

function showVersion(version) {
  badge.textContent = version === null ? "no model yet" : `model v${version}`;
  badge.classList.toggle("missing", version === null);
}

// Says where the strip's words come from when they are the person's own model's, or why they cannot be.
function showPersonal(text) {
  personalLine.textContent = text ?? "";
  personalLine.hidden = !text;
}

function describeSource(answer) {
  if (answer.model !== "personal") return null;
  const messages = `${answer.personal_messages} of your message${answer.personal_messages === 1 ? "" : "s"}`;
  return `Suggestions from your personal model: model v${answer.model_version} fine-tuned on this machine on ` +
    `${messages}. It is built here from your own history, which never leaves this machine.`;
}

// A personal model exists only while this browser is a phone.
const personalWanted = () => phoneInputs.enabled.checked && personalChoice.checked;

function showStatus(text) {
  statusLine.textContent = text ?? "";
  statusLine.hidden = !text;
}

// The model learned from one-line messages, each read from its start: so the context is the
// sentence or line being typed. It also keeps the server's remembered state short, and its
// start moves only when a sentence ends, so each keystroke costs the server one model step.
function currentMessage(text) {
  let start = text.lastIndexOf("\n") + 1;
  for (const end of text.matchAll(/[.!?]\s+/g)) start = Math.max(start, end.index + end[0].length);
  return text.slice(start).slice(-CONTEXT_CHARS);
}

async function updateSuggestions({ force = false } = {}) {
  const context = message.value.slice(0, message.selectionStart);
  const personal = personalWanted();
  if (context === requestedContext && personal === requestedPersonal && !force) return;
  requestedContext = context;
  requestedPersonal = personal;
  const request = ++latestRequest;
  // Until the answer comes, the words on screen belong to older text: grey and not clickable.
  strip.setAttribute("aria-busy", "true");
  buttons.forEach((button) => (button.disabled = true));

  const query = `text=${encodeURIComponent(currentMessage(context))}${personal ? "&personal=true" : ""}`;
  const [status, body] = await getJson(`api/suggest?${query}`);
  if (request !== latestRequest) return;
  if (status === 200) {
    showWords(body.suggestions, body.suggestions.length ? "" : "No suggestions");
    showVersion(body.model_version);
    showPersonal(describeSource(body));
    return;
  }
  requestedContext = null; // so the next poll asks again
  showPersonal(null);
  if (status === 409 && personal) {
    // No personal model yet (nothing sent to learn from), or the phone was switched off elsewhere.
    showWords([], "No personal suggestions yet");
    showPersonal(typeof body.detail === "string" ? body.detail : null);
    return;
  }
  if (status === 503) {
    // No model yet; the poll below tells why.
    showWords([], "Waiting for the aggregator…");
    return;
  }
  showWords([], "No suggestions right now");
  if (status === 0) showStatus(SERVER_DOWN);
  else showStatus(typeof body.detail === "string" ? body.detail : `The demo server answered ${status}.`);
}

function describeModelState(info) {
  if (info.error && info.model_version !== null) return `Still using model v${info.model_version}: ${info.error}`;
  if (info.error) return `No model yet: ${info.error}`;
  if (info.model_version === null) return `Fetching the model from the aggregator at ${info.aggregator}…`;
  return "";
}

function showPrivacy(info) {
  privacyBadge.hidden = !info.differential_privacy;
  if (!info.differential_privacy) return;
  privacyBadge.textContent = info.epsilon === null
    ? "ε 0 so far"
    : `ε ${info.epsilon.toPrecision(3)} at δ ${info.dp_delta.toExponential(1)}`;
}

// How good the model is, in the words a person typing reads: the run's final score on every phone once it has
// ended, else the phones' own score of the newest global model they were asked to score.
function showScore(score) {
  const line = document.getElementById("score");
  line.hidden = !score;
  if (!score) return;
  const percent = (value) => `${(100 * value).toFixed(1)}%`;
  line.textContent = `Model v${score.model_version}'s first suggestion was the next word ${percent(score.recall_at_1)} ` +
    `of the time, one of its three ${percent(score.recall_at_3)}, on ${score.scored_on} held-out messages.`;
}

// The page learns of new model versions by asking the demo as often as the demo asks the aggregator.
async function pollModel() {
  const [status, info] = await getJson("api/model");
  if (status === 200) {
    pollMs = info.refresh_seconds * 1000;
    aggregatorLabel.textContent = info.aggregator;
    showVersion(info.model_version);
    showPrivacy(info);
    showScore(info.score);
    showStatus(describeModelState(info));
    const changed = info.model_version !== knownVersion;
    knownVersion = info.model_version;
    updateSuggestions({ force: changed });
  } else {
    showStatus(status === 0 ? SERVER_DOWN : `The demo server answered ${status}.`);
  }
  setTimeout(pollModel, pollMs);
}

function insert(word) {
  const before = message.value.slice(0, message.selectionStart);
  if (before !== requestedContext) return updateSuggestions();
  const partial = before.match(PARTIAL_WORD)?.[0] ?? "";
  let after = message.value.slice(message.selectionEnd);
  if (partial) after = after.replace(REST_OF_WORD, ""); // the caret was inside a word: replace all of it
  // Inserted as shown: the server has cased it (web_demo/casing.py).
  const head = before.slice(0, before.length - partial.length) + word + " ";
  message.value = head + after.replace(/^ /, ""); // one space after the word, not two
  message.setSelectionRange(head.length, head.length);
  message.focus();
  updateSuggestions();
}

message.addEventListener("input", () => updateSuggestions());
// Tab takes the middle (best) suggestion; with none on screen it moves focus as usual.
message.addEventListener("keydown", (event) => {
  const best = buttons[SLOT_OF_RANK[0]];
  if (event.key !== "Tab" || event.shiftKey || event.altKey || event.ctrlKey || event.metaKey) return;
  // While the strip waits for words for the new text, Tab waits too rather than leaving the text box.
  const waiting = strip.getAttribute("aria-busy") === "true" && best.textContent;
  if (best.disabled && !waiting) return;
  event.preventDefault();
  if (!best.disabled) insert(best.textContent);
});
document.addEventListener("selectionchange", () => {
  if (document.activeElement === message) updateSuggestions();
});
buttons.forEach((button) => {
  button.addEventListener("mousedown", (event) => event.preventDefault()); // keep the caret in the text box
  button.addEventListener("click", () => insert(button.textContent));
});
// "This browser is a phone": the switch, the conditions, and sending a message into the phone's history.
const phoneInputs = {
  enabled: document.getElementById("phone-enabled"),
  charging: document.getElementById("phone-charging"),
  idle: document.getElementById("phone-idle"),
  wifi: document.getElementById("phone-wifi"),
};
const phonePanel = document.getElementById("phone-panel");
const phoneStatus = document.getElementById("phone-status");
const sendButton = document.getElementById("send");

// Each change the person makes counts up; an answer to a GET that left before the latest change is stale.
let phoneChanges = 0;

function showPhone(state) {
  for (const [name, input] of Object.entries(phoneInputs)) {
    input.checked = state[name];
    input.disabled = false; // enabled once the phone's saved settings are on screen
  }
  phonePanel.hidden = !state.enabled;
  document.getElementById("phone-path").textContent = state.history_path;
  const joined = state.rounds_joined;
  const rounds = joined.length
    ? ` Joined ${joined.length} round${joined.length === 1 ? "" : "s"}, the latest round ${joined[joined.length - 1]}.` : "";
  phoneStatus.textContent = `${state.messages} message${state.messages === 1 ? "" : "s"} in its history; ` +
    `${state.eligible ? "eligible" : "not eligible"}. Last: ${state.activity}.${rounds}`;
  // Switched on or off (here or on another page): personal suggestions start or stop.
  updateSuggestions();
}

async function phoneRequest(method, url, body) {
  const changes = method === "GET" ? phoneChanges : ++phoneChanges;
  try {
    const response = await fetch(url, {
      method, headers: { "Content-Type": "application/json" }, body: body && JSON.stringify(body),
    });
    const answer = await response.json().catch(() => ({}));
    if (changes !== phoneChanges) return response.ok;
    if (response.ok) showPhone(answer);
    else phoneStatus.textContent = typeof answer.detail === "string" ? answer.detail : `The demo server answered ${response.status}.`;
    return response.ok;
  } catch {
    phoneStatus.textContent = SERVER_DOWN;
    return false;
  }
}

function configurePhone() {
  const settings = Object.fromEntries(Object.entries(phoneInputs).map(([name, input]) => [name, input.checked]));
  phoneRequest("PUT", "api/phone", settings);
}

async function sendMessage() {
  const text = message.value.trim();
  if (!text) return;
  if (await phoneRequest("POST", "api/phone/messages", { text }) && message.value.trim() === text) {
    message.value = "";
    message.focus();
    updateSuggestions();
  }
}

async function pollPhone() {
  await phoneRequest("GET", "api/phone");
  setTimeout(pollPhone, phoneInputs.enabled.checked ? 2000 : 10000);
}

Object.values(phoneInputs).forEach((input) => input.addEventListener("change", configurePhone));
personalChoice.addEventListener("change", () => updateSuggestions());
sendButton.addEventListener("click", sendMessage);
pollModel();
pollPhone();
