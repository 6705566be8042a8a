// The kernelbox playground: plain DOM code over the service's public HTTP API (README.md,
// "HTTP API"), with no framework and no build step. Everything a kernel sends back is
// untrusted: text goes in through textContent, HTML results into sandboxed frames without
// scripts, images only as data: URLs of their own type (the page's CSP forbids the rest).

const KEY_STORE = "kernelbox.apiKey"; // sessionStorage: gone when the tab closes
const SESSION_STORE = "kernelbox.session";
const DEFAULT_CODE = `import numpy as np
import matplotlib.pyplot as plt

x = np.linspace(0, 2 * np.pi, 200)
print(f"plotting {len(x)} points")
plt.plot(x, np.sin(x), label="sin")
plt.plot(x, np.cos(x), label="cos")
plt.legend()
plt.show()
`;

const $ = (id) => document.getElementById(id);
const state = { config: null, session: "", running: false, editor: null };

// -- HTTP ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// Relative to the page, so a service mounted under a prefix (root_path) works too.
const url = (path) => new URL(path, document.baseURI);
const sessionPath = (rest = "") => `v1/sessions/${encodeURIComponent(state.session)}${rest}`;
const filePath = (path) => sessionPath(`/files/${path.split("/").map(encodeURIComponent).join("/")}`);

async function call(path, { method = "GET", json, body, headers = {} } = {}) {
  const sent = new Headers(headers);
  if (json !== undefined) {
    sent.set("Content-Type", "application/json");
    body = JSON.stringify(json);
  }
  for (;;) {
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) sent.set("Authorization", `Bearer ${key}`);
    else sent.delete("Authorization");
    const answer = await fetch(url(path), { method, headers: sent, body });
    if (answer.status === 401 && state.config?.auth) {
      await askForKey(key ? "The service refused that key." : "");
      continue; // the body is a string or a File: it can be sent again
    }
    if (!answer.ok) throw await apiError(answer);
    return answer;
  }
}

async function apiError(answer) {
  let code = "http_" + answer.status;
  let message = `${answer.status} ${answer.statusText}`;
  try {
    const body = await answer.json();
    if (body?.error) ({ code, message } = body.error);
  } catch {
    // not the service's JSON error (a proxy's page, say): the status line says enough
  }
  return new ApiError(answer.status, code, message);
}

function askForKey(why) {
  const dialog = $("key-dialog");
  $("key-error").textContent = why;
  $("key-error").hidden = !why;
  $("api-key").value = "";
  if (!dialog.open) dialog.showModal();
  return new Promise((resolve) => {
    $("key-form").addEventListener(
      "submit",
      () => {
        sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
        $("forget-key").hidden = false;
        resolve();
      },
      { once: true },
    );
  });
}

// Server-sent events from a fetch body (EventSource cannot POST nor send a key).
async function* events(answer) {
  const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

function notify(message) {
  const notice = $("notice");
  notice.textContent = message;
  notice.hidden = !message;
}

function report(error) {
  console.error(error);
  notify(error instanceof ApiError ? `${error.message} (${error.code})` : String(error));
}

// -- outputs ------------------------------------------------------------------------------

const ANSI = /\x1b\[[0-9;?]*[A-Za-z]/g;
const BASE64 = /^[A-Za-z0-9+/=\s]+$/;
const SHOWN_CHARS = 200_000; // per block of one stream

// Code as it was run, highlighted like the editor (Ace's static highlighter, no editor).
function codeBlock(code) {
  const block = element("pre", "code", code);
  try {
    ace.require("ace/ext/static_highlight")(block, {
      mode: "ace/mode/python",
      theme: "ace/theme/github_light_default",
      showGutter: false,
      trim: false,
    });
  } catch (error) {
    console.warn("no highlighting", error); // the plain text stays
  }
  return block;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// One cell's output area; consecutive chunks of a stream go into one block.
class Output {
  constructor(container) {
    this.container = container;
    this.last = null;
    this.errors = []; // the error blocks shown
  }

  stream(name, text) {
    if (!text) return;
    if (this.last?.dataset.stream !== name) {
      this.last = element("pre", `stream ${name}`);
      this.last.dataset.stream = name;
      this.container.append(this.last);
    }
    // The service bounds what it sends, but megabytes of text would still stall the page.
    const shown = this.last.textContent.length;
    if (shown >= SHOWN_CHARS) return;
    const clean = text.replace(ANSI, "");
    this.last.textContent += clean.slice(0, SHOWN_CHARS - shown);
    if (shown + clean.length > SHOWN_CHARS) {
      this.container.append(element("p", "note", `${name}: the page shows the first ${SHOWN_CHARS.toLocaleString("en")} characters`));
    }
  }

  result(result) {
    this.last = null;
    const data = result?.data ?? {};
    for (const mime of ["image/png", "image/jpeg"]) {
      if (typeof data[mime] === "string" && BASE64.test(data[mime])) {
        return this.image(`data:${mime};base64,${data[mime].replace(/\s/g, "")}`, data["text/plain"]);
      }
    }
    if (typeof data["image/svg+xml"] === "string") {
      // An <img> never runs an SVG's scripts.
      return this.image(`data:image/svg+xml;charset=utf-8,${encodeURIComponent(data["image/svg+xml"])}`);
    }
    if (typeof data["text/html"] === "string") return this.html(data["text/html"]);
    const plain = typeof data["text/plain"] === "string" ? data["text/plain"] : JSON.stringify(data);
    this.container.append(element("pre", "result", plain.replace(ANSI, "")));
  }

  image(src, alt) {
    const img = element("img", "figure");
    img.src = src;
    img.alt = typeof alt === "string" ? alt : "figure";
    this.container.append(img);
  }

  html(markup) {
    // No allow-scripts: the frame only shows. allow-same-origin lets the page size it.
    const frame = element("iframe", "html-result");
    frame.setAttribute("sandbox", "allow-same-origin");
    frame.setAttribute("referrerpolicy", "no-referrer");
    frame.srcdoc = `<!doctype html><meta charset="utf-8"><style>${FRAME_STYLE}</style>${markup}`;
    frame.addEventListener("load", () => {
      const height = frame.contentDocument?.documentElement.scrollHeight ?? 0;
      frame.style.height = `${Math.min(Math.max(height, 40), 600) + 4}px`;
    });
    this.container.append(frame);
  }

  error(error) {
    this.last = null;
    if (!error) return;
    const text = error.traceback?.length ? error.traceback.join("\n") : `${error.name}: ${error.value}`;
    this.errors.push(element("pre", "stream error", text.replace(ANSI, "")));
    this.container.append(this.errors.at(-1));
  }

  // The Execution's own error where it says more than what streamed: at a deadline the
  // kernel's KeyboardInterrupt streams first, though the run ended because time was up.
  settle(execution) {
    const error = execution.error;
    if (!error) return;
    if (execution.status === "timeout" || execution.status === "died" || !this.errors.length) {
      for (const shown of this.errors.splice(0)) shown.remove();
      this.error(error);
    }
  }

  // A whole Execution (a replayed one): its outputs in the order they arrived.
  execution(execution) {
    const outputs = execution.outputs ?? [];
    for (const out of outputs) {
      if (out.type === "stream") this.stream(out.name ?? "stdout", out.text ?? "");
      else if (out.type === "result") this.result(execution.results?.[out.index]);
      else if (out.type === "error") this.error(execution.error);
    }
    if (!outputs.length) {
      this.stream("stdout", execution.stdout);
      this.stream("stderr", execution.stderr);
      for (const result of execution.results ?? []) this.result(result);
      this.error(execution.error);
    }
  }
}

const FRAME_STYLE = `body{margin:0;font:13px system-ui,sans-serif}
table{border-collapse:collapse}th,td{border:1px solid #d0d7de;padding:2px 8px;text-align:right}
thead th{background:#f6f8fa}`;

// The footer of a finished run: status, notes, and its model-ready text in any format.
function footer(container, execution) {
  const foot = element("div", "cell-footer");
  const status = element("span", `status status-${execution.status}`, execution.status);
  const ms = Math.round(execution.duration_ms ?? 0);
  foot.append(status, element("span", "muted", ` ${ms} ms`));
  if (execution.kernel_restarted) foot.append(element("span", "warning", " · kernel restarted: state lost"));
  if (execution.resumed) foot.append(element("span", "muted", " · resumed after a pause"));
  if (execution.truncated) foot.append(element("span", "warning", " · output truncated"));
  container.append(foot);
  for (const note of execution.notes ?? []) container.append(element("p", "note", note));
  container.append(renderings(execution));
}

function renderings(execution) {
  const box = element("details", "renderings");
  box.append(element("summary", "", "Model view"));
  const choose = element("select", "format");
  for (const name of state.config?.formats ?? ["qwen"]) choose.append(new Option(name, name));
  const text = element("pre", "model-text");
  const show = async () => {
    text.textContent = "…";
    try {
      const answer = await call("v1/render", { method: "POST", json: { execution, format: choose.value } });
      const { text: rendered, message } = await answer.json();
      text.textContent = typeof message === "string" ? rendered : JSON.stringify(message, null, 2);
    } catch (error) {
      text.textContent = "";
      report(error);
    }
  };
  choose.addEventListener("change", show);
  box.addEventListener("toggle", () => box.open && !text.textContent && show());
  box.append(choose, text);
  return box;
}

// -- sessions -----------------------------------------------------------------------------

async function refreshSessions() {
  const sessions = await (await call("v1/sessions")).json();
  const select = $("session");
  select.replaceChildren(new Option("a new one on the first run", ""));
  for (const s of sessions) {
    select.append(new Option(`${s.id} · ${s.status} · runs: ${s.execution_count}`, s.id));
  }
  const wanted = state.session || sessionStorage.getItem(SESSION_STORE) || "";
  useSession(sessions.some((s) => s.id === wanted) ? wanted : "");
}

function useSession(id) {
  state.session = id;
  $("session").value = id;
  $("delete-session").disabled = !id;
  if (id) sessionStorage.setItem(SESSION_STORE, id);
  else sessionStorage.removeItem(SESSION_STORE);
  refreshFiles().catch(report);
}

async function newSession() {
  const session = await (await call("v1/sessions", { method: "POST", json: {} })).json();
  state.session = session.id;
  await refreshSessions();
  return session.id;
}

async function deleteSession() {
  if (!state.session) return;
  await call(sessionPath(), { method: "DELETE" });
  state.session = "";
  $("cells").replaceChildren();
  await refreshSessions();
}

// -- running code -------------------------------------------------------------------------

function setRunning(running) {
  state.running = running;
  $("run").disabled = running;
  $("interrupt").disabled = !running;
  $("run-state").textContent = running ? "running…" : "";
}

async function run() {
  if (state.running) return;
  const code = state.editor.getValue();
  setRunning(true);
  notify("");
  const cell = element("article", "cell running");
  cell.append(codeBlock(code));
  const outputs = element("div", "outputs");
  cell.append(outputs);
  $("cells").append(cell);
  cell.scrollIntoView({ block: "nearest" });
  const out = new Output(outputs);
  try {
    if (!state.session) await newSession();
    const timeout = Number($("timeout").value) || undefined;
    const answer = await call(sessionPath("/execute"), {
      method: "POST",
      json: { code, timeout, stream: true },
    });
    for await (const { event, data } of events(answer)) {
      if (event === "stdout" || event === "stderr") out.stream(event, data.text);
      else if (event === "result") out.result(data);
      else if (event === "error") out.error(data);
      else if (event === "end") {
        cell.dataset.status = data.status;
        cell.prepend(element("span", "prompt", `[${data.execution_count ?? " "}]`));
        out.settle(data);
        footer(cell, data);
      } else if (event === "fail") throw new ApiError(0, data.error.code, data.error.message);
    }
  } catch (error) {
    cell.dataset.status = "failed";
    report(error);
  } finally {
    cell.classList.remove("running");
    setRunning(false);
    refreshFiles().catch(report);
    refreshSessions().catch(report);
  }
}

async function interrupt() {
  if (!state.session) return;
  // Pressed just after Run, the code may not have reached the kernel yet: try for a while.
  for (let tries = 0; tries < 20 && state.running; tries++) {
    const { interrupted } = await (await call(sessionPath("/interrupt"), { method: "POST" })).json();
    if (interrupted) return;
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

async function restart() {
  if (!state.session) return;
  $("run-state").textContent = "restarting…";
  try {
    await call(sessionPath("/restart"), { method: "POST" });
  } finally {
    $("run-state").textContent = state.running ? "running…" : "";
  }
  $("cells").append(element("p", "note", "Kernel restarted: variables are gone, files are kept."));
}

async function pause() {
  if (!state.session) return;
  await call(sessionPath("/pause"), { method: "POST" });
  $("cells").append(
    element("p", "note", "Paused: the kernel is stopped, its variables saved; the next run resumes it.")
  );
}

async function saveNotebook() {
  if (!state.session) return;
  saveBlob(await (await call(sessionPath("/notebook"))).blob(), `${state.session}.ipynb`);
}

// -- files --------------------------------------------------------------------------------

async function refreshFiles() {
  const list = $("files");
  if (!state.session) {
    list.replaceChildren(element("li", "muted", "no session yet"));
    return;
  }
  const files = await (await call(sessionPath("/files"))).json();
  list.replaceChildren();
  if (!files.length) list.append(element("li", "muted", "no files"));
  for (const file of files) {
    const item = element("li", "file");
    const link = element("button", "link", file.path);
    link.type = "button";
    link.title = "download";
    link.addEventListener("click", () => download(file.path).catch(report));
    const remove = element("button", "remove", "✕");
    remove.type = "button";
    remove.title = `delete ${file.path}`;
    remove.addEventListener("click", () =>
      call(filePath(file.path), { method: "DELETE" }).then(refreshFiles).catch(report),
    );
    item.append(link, element("span", "muted", ` ${size(file.size)} `), remove);
    list.append(item);
  }
}

function size(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 ** 2) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 ** 2).toFixed(1)} MiB`;
}

// A download needs the key in a header, so it goes through fetch and a blob URL.
function saveBlob(blob, name) {
  const link = element("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}

async function download(path) {
  saveBlob(await (await call(filePath(path))).blob(), path.split("/").pop());
}

async function upload(files) {
  if (!files.length) return;
  if (!state.session) await newSession();
  for (const file of files) {
    await call(filePath(file.name), {
      method: "PUT",
      body: file,
      headers: { "Content-Type": "application/octet-stream" },
    });
  }
  $("upload").value = "";
  await refreshFiles();
}

// -- replaying an agent's transcript -------------------------------------------------------

// `kernelbox agent --json` prints the AgentResult; a stream of events (one JSON object a
// line, the last `final`) is taken too.
function parseTranscript(text) {
  text = text.trim();
  if (!text) throw new Error("nothing to replay: paste the JSON or open a file");
  let items;
  try {
    items = [JSON.parse(text)];
  } catch {
    items = text.split("\n").filter((line) => line.trim()).map((line) => JSON.parse(line));
  }
  const final = items.find((item) => item?.kind === "final");
  const result = final?.result ?? items.find((item) => Array.isArray(item?.steps));
  if (result) return result;
  // Events without a final one (a run cut short): the steps they describe.
  const steps = [];
  for (const item of items) {
    if (item?.kind === "code") steps.push({ code: item.code });
    else if (item?.kind === "output" && steps.length) steps.at(-1).execution = item.execution;
    else if (item?.kind === "tool_error") steps.push({ error: item.message });
  }
  if (!steps.length) throw new Error("no agent result nor agent events in that text");
  return { question: "", answer: "", steps };
}

const replay = { cards: [], shown: 0 };

function loadTranscript(text) {
  const result = parseTranscript(text);
  const cards = [];
  const question = element("article", "cell replay-question");
  question.append(element("h3", "", "Question"), element("p", "prose", result.question || "(not recorded)"));
  cards.push(question);
  (result.steps ?? []).forEach((step, i) => {
    const card = element("article", "cell replay-step");
    card.append(element("h3", "", `Step ${i + 1}`));
    if (step.request) card.append(element("p", "prose request", step.request));
    if (step.code) card.append(codeBlock(step.code));
    const outputs = element("div", "outputs");
    card.append(outputs);
    if (step.error) outputs.append(element("pre", "stream error", step.error));
    if (step.execution) {
      new Output(outputs).execution(step.execution);
      footer(card, step.execution);
    }
    cards.push(card);
  });
  const answer = element("article", "cell replay-answer");
  answer.append(element("h3", "", "Answer"), element("p", "prose", result.answer || "(none)"));
  if (result.transcript) {
    const raw = element("details", "renderings");
    raw.append(element("summary", "", "What the model saw and wrote"), element("pre", "model-text", result.transcript));
    answer.append(raw);
  }
  cards.push(answer);
  replay.cards = cards;
  $("replay-steps").replaceChildren(...cards);
  showReplay(1);
}

function showReplay(shown) {
  replay.shown = Math.max(1, Math.min(shown, replay.cards.length));
  replay.cards.forEach((card, i) => (card.hidden = i >= replay.shown));
  replay.cards[replay.shown - 1]?.scrollIntoView({ block: "nearest" });
  $("replay-prev").disabled = replay.shown <= 1;
  $("replay-next").disabled = $("replay-all").disabled = replay.shown >= replay.cards.length;
  $("replay-position").textContent = `${replay.shown} of ${replay.cards.length}`;
}

async function readTranscript() {
  const file = $("transcript-file").files[0];
  if (file) $("transcript-text").value = await file.text();
  loadTranscript($("transcript-text").value);
}

// -- wiring -------------------------------------------------------------------------------

function tab(name) {
  for (const view of ["run", "replay"]) {
    $(`${view}-view`).hidden = view !== name;
    $(`tab-${view}`).setAttribute("aria-selected", String(view === name));
  }
}

function editor() {
  const ed = ace.edit("editor", {
    mode: "ace/mode/python",
    theme: "ace/theme/github_light_default",
    value: DEFAULT_CODE,
    minLines: 8,
    maxLines: 30,
    fontSize: 14,
    showPrintMargin: false,
    tabSize: 4,
    useSoftTabs: true,
  });
  ed.commands.addCommand({
    name: "run",
    bindKey: { win: "Shift-Enter", mac: "Shift-Enter" },
    exec: () => run(),
  });
  ed.clearSelection();
  return ed;
}

const guard = (fn) => () => fn().catch(report);

async function main() {
  state.editor = editor();
  state.editor.focus();
  state.config = await (await fetch(url("playground/config.json"))).json();
  $("version").textContent = `kernelbox ${state.config.version}`;
  $("forget-key").hidden = !sessionStorage.getItem(KEY_STORE);
  // Escape would close the key dialog and leave the call that asked waiting for ever.
  $("key-dialog").addEventListener("cancel", (e) => e.preventDefault());
  $("tab-run").addEventListener("click", () => tab("run"));
  $("tab-replay").addEventListener("click", () => tab("replay"));
  $("run").addEventListener("click", guard(run));
  $("interrupt").addEventListener("click", guard(interrupt));
  $("restart").addEventListener("click", guard(restart));
  $("pause").addEventListener("click", guard(pause));
  $("notebook").addEventListener("click", guard(saveNotebook));
  $("new-session").addEventListener("click", guard(async () => {
    await newSession();
    $("cells").replaceChildren();
  }));
  $("delete-session").addEventListener("click", guard(deleteSession));
  $("session").addEventListener("change", (e) => {
    $("cells").replaceChildren();
    useSession(e.target.value);
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    location.reload();
  });
  $("refresh-files").addEventListener("click", guard(refreshFiles));
  $("upload").addEventListener("change", (e) => upload([...e.target.files]).catch(report));
  $("load-transcript").addEventListener("click", guard(readTranscript));
  $("replay-prev").addEventListener("click", () => showReplay(replay.shown - 1));
  $("replay-next").addEventListener("click", () => showReplay(replay.shown + 1));
  $("replay-all").addEventListener("click", () => showReplay(replay.cards.length));
  if (state.config.auth && !sessionStorage.getItem(KEY_STORE)) await askForKey("");
  await refreshSessions();
  document.body.dataset.ready = "true"; // for tests and scripts: the page is wired up
}

main().catch(report);
