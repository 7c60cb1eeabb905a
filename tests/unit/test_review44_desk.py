"""Review 44, desk page (static/desk.js): a failed request must not leave the page dead or blank.

desk.js runs under node against a minimal fake DOM, fetch and timer queue (no browser). Skipped without node.
REVIEW44_DESK_JS names another desk.js to run (an old copy, to see these tests fail on it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

DESK_JS = Path(__file__).resolve().parents[2] / "services" / "desk" / "static" / "desk.js"
NODE = shutil.which("node")

# Runs desk.js in a vm context. argv: desk.js, then a JSON list of answers for fetch, in order: an object
# {"status", "body"} or "network" (fetch rejects, as while the desk restarts). Prints the page's state after
# each step of the scenario named in argv[4].
HARNESS = r"""
const fs = require("fs"), vm = require("vm");
const [src, answersJson, scenario] = [fs.readFileSync(process.argv[2], "utf8"), process.argv[3], process.argv[4]];
const answers = JSON.parse(answersJson), calls = [];
const byId = new Map();
function element(id) {
  const node = {
    id, hidden: false, textContent: "", value: "", disabled: false, className: "", maxLength: 0, dataset: {},
    children: [], listeners: {}, classList: { toggle() {}, add() {}, remove() {} },
    get firstChild() { return this.children[0] || null; },
    appendChild(c) { this.children.push(c); return c; },
    removeChild(c) { this.children.splice(this.children.indexOf(c), 1); return c; },
    addEventListener(type, fn) { (this.listeners[type] = this.listeners[type] || []).push(fn); },
    setAttribute() {}, focus() {}, blur() {},
    click() { for (const fn of this.listeners.click || []) fn(); },
  };
  node.tBodies = id ? [element("")] : [];
  return node;
}
function $(id) {
  if (!byId.has(id)) byId.set(id, element(id));
  return byId.get(id);
}
for (const id of ["login", "desk", "who"]) $(id).hidden = true;  // as index.html has them
const docListeners = {};
const store = new Map([["synpref-desk-token", "stored-token"]]);
let timers = [], nextTimer = 1;
const context = {
  document: {
    getElementById: $, createElement: () => element(""), querySelectorAll: () => [],
    addEventListener(type, fn) { docListeners[type] = fn; },
  },
  sessionStorage: {
    getItem: (k) => (store.has(k) ? store.get(k) : null), setItem: (k, v) => store.set(k, v),
    removeItem: (k) => store.delete(k),
  },
  window: { scrollTo() {} },
  setTimeout(fn) { const id = nextTimer++; timers.push({ id, fn }); return id; },
  clearTimeout(id) { timers = timers.filter((t) => t.id !== id); },
  HTMLInputElement: class {}, HTMLTextAreaElement: class {},
  async fetch(path) {
    calls.push(path);
    const answer = answers.shift();
    if (answer === undefined || answer === "network") throw new TypeError("Failed to fetch");
    return { status: answer.status, ok: answer.status < 400, json: async () => answer.body };
  },
};
vm.createContext(context);
vm.runInContext(src, context);
const settle = async () => { for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r)); };
const snapshot = (step) => ({
  step, calls: calls.slice(), timers: timers.length, login: !$("login").hidden, desk: !$("desk").hidden,
  loginError: $("login-error").textContent, status: $("status").textContent, empty: !$("empty").hidden,
});
(async () => {
  const out = [];
  docListeners.DOMContentLoaded();
  await settle();
  out.push(snapshot("loaded"));
  for (let i = 0; i < 3; i++) {  // the page's own timers: its "checks again every few seconds"
    const timer = timers.shift();
    if (!timer) break;
    timer.fn();
    await settle();
    out.push(snapshot("timer " + (i + 1)));
  }
  console.log(JSON.stringify(out));
})();
"""

SESSION = {"status": 200, "body": {"annotator": "alice", "guideline": "g", "overlap": 1, "max_note": 2000}}
PROGRESS = {
    "done": 0,
    "waiting": 0,
    "pending": 0,
    "overlap": 1,
    "outcomes": {"verified": 0, "flipped": 0, "discarded": 0},
    "per_annotator": {},
    "agreement": {"pairs": 0, "mean": None, "unanimous": 0, "recent": []},
}
NOTHING = {"status": 200, "body": {"pair": None, "progress": PROGRESS}}


def run_page(tmp_path: Path, answers: list[Any]) -> list[dict[str, Any]]:
    assert NODE is not None
    script = tmp_path / "harness.js"
    script.write_text(HARNESS)
    desk_js = Path(os.environ.get("REVIEW44_DESK_JS", DESK_JS))
    done = subprocess.run(
        [NODE, str(script), str(desk_js), json.dumps(answers), "page"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    steps: list[dict[str, Any]] = json.loads(done.stdout)
    return steps


needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")


@needs_node
def test_an_idle_page_keeps_checking_after_a_failed_check(tmp_path: Path) -> None:
    # Logged in, nothing to review; then one check fails (the desk restarting, or an ingress 503 while it is
    # unready), then the desk answers again. Before, the failed check ended the page's checking for good.
    unready = {"status": 503, "body": {"error": "unready"}}
    steps = run_page(tmp_path, [SESSION, NOTHING, "network", unready, NOTHING])
    assert len(steps) == 4, f"the page stopped checking after a failed check: {steps[-1]}"
    loaded, first, second, third = steps
    assert loaded["desk"] and loaded["empty"] and loaded["timers"] == 1
    assert first["calls"][-1] == "/api/next" and "Error" in first["status"]
    assert first["timers"] == 1, "after a failed check the page must check again"
    assert second["calls"][-1] == "/api/next" and second["timers"] == 1
    assert third["calls"] == ["/api/session", "/api/next", "/api/next", "/api/next", "/api/next"]
    assert third["status"] == "", "the error is cleared once the desk answers again"


@needs_node
def test_a_stored_token_that_cannot_log_in_yet_shows_why_and_retries(tmp_path: Path) -> None:
    # A reload while the desk restarts: the token is fine but nothing answers. Before, both the login form
    # and the desk stayed hidden (a blank page) and the error went to the hidden desk's status line.
    steps = run_page(tmp_path, ["network", SESSION, NOTHING])
    loaded = steps[0]
    assert loaded["login"] and not loaded["desk"], loaded
    assert "Failed to fetch" in loaded["loginError"], loaded
    assert loaded["timers"] == 1, "the page tries the stored token again"
    retried = steps[1]
    assert retried["desk"] and not retried["login"]
    assert retried["calls"] == ["/api/session", "/api/session", "/api/next"]


@needs_node
def test_a_refused_token_still_logs_out_without_retrying(tmp_path: Path) -> None:
    steps = run_page(tmp_path, [{"status": 401, "body": {"error": "a valid annotator token is required"}}])
    assert steps == [steps[0]] and steps[0]["login"] and not steps[0]["desk"] and steps[0]["timers"] == 0
    assert steps[0]["loginError"] == "Your token was not accepted."
