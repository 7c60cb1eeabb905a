// SynPref review desk. Every value from the server is untrusted text (pairs hold arbitrary
// HTML and script): it is only ever set with textContent on elements made here, never
// parsed as HTML. The Content-Security-Policy forbids inline script as a second line.
"use strict";

const KEY = "synpref-desk-token";
const POLL_MS = 3000;
const state = { token: sessionStorage.getItem(KEY) || "", pair: null, choice: null, busy: false, poll: null, failed: false };

const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

async function api(path, options = {}) {
  const headers = { Authorization: "Bearer " + state.token };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
    cache: "no-store",
    credentials: "omit",
  });
  let data = null;
  try { data = await response.json(); } catch (_) { data = null; }
  if (response.status === 401) { logout("Your token was not accepted."); throw new Error("unauthorized"); }
  if (!response.ok) {
    const err = new Error((data && data.error) || ("HTTP " + response.status));
    err.status = response.status;
    throw err;
  }
  return data;
}

function renderMessages(container, messages) {
  clear(container);
  for (const m of messages || []) {
    const box = el("div", null, "msg");
    box.appendChild(el("div", m.role, "role"));
    box.appendChild(el("div", m.content, "content"));
    container.appendChild(box);
  }
}

function renderDl(dl, rows) {
  clear(dl);
  for (const [k, v] of rows) {
    if (v === undefined || v === null || v === "" || (Array.isArray(v) && v.length === 0)) continue;
    dl.appendChild(el("dt", k));
    dl.appendChild(el("dd", Array.isArray(v) ? v.join(", ") : v));
  }
}

function renderExamples(examples) {
  const box = $("examples");
  clear(box);
  $("examples-count").textContent = examples.length ? "(" + examples.length + ")" : "";
  if (!examples.length) { box.appendChild(el("p", "None retrieved for this pair.", "muted")); return; }
  for (const ex of examples) {
    const d = el("details", null, "example");
    d.appendChild(el("summary", ex.id + (ex.available ? "" : " (content not on this desk)")));
    if (ex.available) {
      if (ex.attributes) {
        const dl = el("dl", null, "attributes");
        renderDl(dl, [["task", ex.attributes.task_category], ["guideline", ex.attributes.annotation_guideline]]);
        d.appendChild(dl);
      }
      const conv = el("div", null, "messages"); renderMessages(conv, ex.conversation); d.appendChild(conv);
      d.appendChild(el("div", "Preferred by annotators", "label preferred"));
      const pref = el("div", null, "messages"); renderMessages(pref, ex.preferred); d.appendChild(pref);
      d.appendChild(el("div", "Not preferred", "label"));
      const other = el("div", null, "messages"); renderMessages(other, ex.other); d.appendChild(other);
    }
    box.appendChild(d);
  }
}

function renderProgress(p) {
  if (!p) return;
  $("progress-line").textContent = "done " + p.done + " · waiting " + p.waiting;
  renderDl($("progress"), [
    ["you: done", p.done], ["you: waiting", p.waiting], ["pending pairs", p.pending],
    ["annotators per pair", p.overlap], ["verified", p.outcomes.verified], ["flipped", p.outcomes.flipped],
    ["discarded", p.outcomes.discarded],
  ]);
  const body = $("per-annotator").tBodies[0];
  clear(body);
  for (const [who, n] of Object.entries(p.per_annotator)) {
    const tr = el("tr"); tr.appendChild(el("td", who)); tr.appendChild(el("td", n)); body.appendChild(tr);
  }
  const a = p.agreement;
  $("agreement").textContent = a.pairs
    ? a.pairs + (a.pairs === 1 ? " pair" : " pairs") + " labelled by several annotators; mean agreement " +
      Math.round(a.mean * 100) + "%, unanimous " + a.unanimous
    : (p.overlap > 1 ? "No pair fully labelled yet." : "One annotator per pair: no agreement to measure.");
  const recent = $("agreement-recent").tBodies[0];
  clear(recent);
  for (const r of a.recent) {
    const tr = el("tr");
    tr.appendChild(el("td", r.pair_id.slice(0, 10)));
    tr.appendChild(el("td", r.outcome));
    tr.appendChild(el("td", Math.round(r.agreement * 100) + "% of " + r.verdicts));
    recent.appendChild(tr);
  }
}

function setChoice(choice) {
  state.choice = choice;
  for (const b of document.querySelectorAll("button.choice")) {
    b.setAttribute("aria-checked", String(b.dataset.choice === String(choice)));
  }
  $("cand-1").classList.toggle("picked", choice === 1);
  $("cand-2").classList.toggle("picked", choice === 2);
  $("submit").disabled = choice === null || !state.pair || state.busy;
}

function showPair(pair) {
  state.pair = pair;
  const has = pair !== null;
  for (const node of document.querySelectorAll(".work > .card:not(#empty), .candidates")) node.hidden = !has;
  for (const id of ["pair-heading", "attributes", "examples-card"]) $(id).hidden = !has;
  $("empty").hidden = has;
  setChoice(null);
  $("note").value = "";
  if (!has) return;
  $("pair-meta").textContent = pair.pair_id.slice(0, 12) + (pair.source ? " · " + pair.source : "");
  renderMessages($("conversation"), pair.conversation);
  renderMessages($("cand-1-body"), pair.candidates[0]);
  renderMessages($("cand-2-body"), pair.candidates[1]);
  const a = pair.attributes || {};
  renderDl($("attributes"), [
    ["task", a.task_category], ["objectivity", a.objectivity], ["controversiality", a.controversiality],
    ["desired", a.desired_attributes], ["guideline", a.annotation_guideline],
  ]);
  $("pair-heading").textContent = pair.attributes ? "This pair" : "This pair: no attributes";
  renderExamples(pair.examples || []);
  window.scrollTo(0, 0);
}

function checkAgain(fn) {
  clearTimeout(state.poll);  // one timer at a time, even when two loads overlap
  state.poll = setTimeout(fn, POLL_MS);
}

async function loadNext() {
  clearTimeout(state.poll);
  let data;
  try {
    data = await api("/api/next");
  } catch (err) {
    // The desk restarting, or a proxy's 502/503 while it is unready: check again, or the page (idle, or showing
    // the pair just answered) waits forever. A refused token has logged out instead.
    if (err.message !== "unauthorized") checkAgain(() => loadNext().catch(report));
    state.failed = true;
    throw err;
  }
  if (state.failed) { $("status").textContent = ""; state.failed = false; }
  renderProgress(data.progress);
  showPair(data.pair);
  if (data.pair === null) checkAgain(() => loadNext().catch(report));
}

function report(err) {
  if (err && err.message !== "unauthorized") $("status").textContent = "Error: " + err.message;
}

async function submit() {
  if (state.busy || state.choice === null || !state.pair) return;
  state.busy = true;
  $("submit").disabled = true;
  $("status").textContent = "Saving…";
  try {
    const data = await api("/api/verdict", {
      method: "POST",
      // The assignment: a page shown before a desk restart is refused (409) and shown the pair again.
      body: { pair_id: state.pair.pair_id, assignment: state.pair.assignment, choice: state.choice, note: $("note").value },
    });
    $("status").textContent = data.decided ? "Saved; pair decided." : "Saved; waiting for other annotators.";
    state.busy = false;
    await loadNext();
  } catch (err) {
    state.busy = false;
    setChoice(state.choice);
    report(err);
    // 409: the assignment expired or the pair was decided meanwhile; move on to the next one.
    if (err.status === 409) loadNext().catch(report);
  }
}

function onKey(event) {
  if ($("desk").hidden || event.ctrlKey || event.metaKey || event.altKey) return;
  const inNote = event.target === $("note");
  if (inNote) {
    if (event.key === "Escape") { $("note").blur(); event.preventDefault(); }
    else if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); submit(); }
    return;
  }
  if (event.target instanceof HTMLInputElement || event.target instanceof HTMLTextAreaElement) return;
  if (!state.pair) return;
  if (event.key === "1" || event.key === "2" || event.key === "0") { setChoice(Number(event.key)); event.preventDefault(); }
  else if (event.key === "n" || event.key === "N") { $("note").focus(); event.preventDefault(); }
  else if (event.key === "Enter") { event.preventDefault(); submit(); }
}

async function login() {
  clearTimeout(state.poll);
  $("login-error").textContent = "";
  try {
    const s = await api("/api/session");
    $("annotator").textContent = s.annotator;
    $("guideline").textContent = s.guideline;
    $("note").maxLength = s.max_note;
    $("login").hidden = true;
    $("who").hidden = false;
    $("desk").hidden = false;
  } catch (err) {
    if (err.message === "unauthorized") return;  // logout() said why
    // Not a refused token (the desk restarting, throttled, unreachable): say so on the login form, which is
    // otherwise hidden like the desk (a blank page), and try the token again.
    $("login").hidden = false;
    $("login-error").textContent = "Cannot reach the desk (" + err.message + "); trying again…";
    checkAgain(login);
    return;
  }
  await loadNext().catch(report);
}

function logout(message) {
  clearTimeout(state.poll);
  state.token = "";
  state.pair = null;
  sessionStorage.removeItem(KEY);
  $("desk").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-button").addEventListener("click", () => {
    state.token = $("token").value.trim();
    $("token").value = "";
    sessionStorage.setItem(KEY, state.token);
    login();
  });
  $("token").addEventListener("keydown", (e) => { if (e.key === "Enter") $("login-button").click(); });
  $("logout").addEventListener("click", () => logout(""));
  for (const b of document.querySelectorAll("button.choice")) {
    b.addEventListener("click", () => setChoice(Number(b.dataset.choice)));
  }
  $("submit").addEventListener("click", submit);
  document.addEventListener("keydown", onKey);
  if (state.token) login(); else logout("");
});
