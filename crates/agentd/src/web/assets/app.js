// agentd's chat page: ask, watch the answer stream in, and never lose it.
//
// Every event of a run has an id `<run_id>:<seq>`, and the service keeps the run's log. So whatever cuts the stream (a
// dropped connection, a `reconnect` event while a replica hands its streams over, a reload of this page), the page
// attaches again with the last id it showed and gets exactly what it missed. Events it has already shown (a seq not
// above the last one) are dropped, so nothing is shown twice.
//
// Model output is never parsed as HTML: the Markdown renderer below builds DOM nodes and text nodes only, and links
// keep only http(s) and mailto addresses.
"use strict";

const settings = JSON.parse(document.getElementById("agentd-settings").textContent);
const TOKEN_KEY = "agentd.token";
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const MAX_BACKOFF_MS = 2000;

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  signin: $("signin"),
  signinMessage: $("signin-message"),
  signinForm: $("signin-form"),
  tokenInput: $("token"),
  chatMissing: $("chat-missing"),
  chat: $("chat"),
  messages: $("messages"),
  ask: $("ask"),
  question: $("question"),
  model: $("model"),
  send: $("send"),
  stop: $("stop"),
};

const state = {
  token: null,
  chatId: null,
  // The run shown live, if any.
  active: null,
  // Bumped whenever the chat is loaded afresh; loops of an older generation stop.
  generation: 0,
};

// ---- token and chat id ----------------------------------------------------------------------------------------

function fragment() {
  return new URLSearchParams(location.hash.slice(1));
}

function setToken(token) {
  state.token = token;
  try {
    sessionStorage.setItem(TOKEN_KEY, token);
  } catch {
    // Storage may be off; the token then lasts as long as the page.
  }
}

function dropToken() {
  state.token = null;
  try {
    sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // Nothing stored.
  }
}

function loadToken() {
  const fromUrl = fragment().get("token");
  if (fromUrl) {
    setToken(fromUrl);
    return;
  }
  try {
    state.token = sessionStorage.getItem(TOKEN_KEY);
  } catch {
    state.token = null;
  }
}

function loadChat() {
  const chat = fragment().get("chat");
  if (chat && UUID.test(chat)) {
    state.chatId = chat.toLowerCase();
  } else if (!settings.needs_token) {
    // Dev mode: the service makes the chat on its first question.
    state.chatId = newUuid();
  }
  rewriteAddress();
}

// The address keeps the chat (so a reload comes back to it) and never the token (history, bookmarks, screenshots).
function rewriteAddress() {
  const hash = state.chatId ? "#chat=" + state.chatId : "";
  history.replaceState(null, "", location.pathname + location.search + hash);
}

function newUuid() {
  if (crypto.randomUUID) {
    return crypto.randomUUID();
  }
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// An embedding application hands a token (and optionally the chat) over with
// `frame.contentWindow.postMessage({type: "agentd:token", token, chat}, "<this page's origin>")`; only its own origin
// and the ones the service lists (AGENT_HTTP_CORS_ORIGINS) are heard.
function trusted(origin) {
  return origin === location.origin || settings.embed_origins.includes(origin);
}

window.addEventListener("message", (event) => {
  const data = event.data;
  if (!trusted(event.origin) || !data || data.type !== "agentd:token" || typeof data.token !== "string") {
    return;
  }
  setToken(data.token);
  if (typeof data.chat === "string" && UUID.test(data.chat)) {
    state.chatId = data.chat.toLowerCase();
    rewriteAddress();
  }
  start();
});

// Tells an embedding application that the page is ready for a token.
function announce() {
  const targets = [window.parent !== window ? window.parent : null, window.opener].filter(Boolean);
  for (const target of targets) {
    for (const origin of settings.embed_origins) {
      try {
        target.postMessage({ type: "agentd:ready", needs_token: !state.token }, origin);
      } catch {
        // Not that origin.
      }
    }
  }
}

// ---- talking to the service ----------------------------------------------------------------------------------

function chatPath(rest) {
  return `/agents/chats/${state.chatId}${rest}`;
}

function runPath(runId, rest) {
  return chatPath(`/runs/${runId}${rest}`);
}

function headers(extra) {
  const all = { ...extra };
  if (state.token) {
    all.Authorization = "Bearer " + state.token;
  }
  return all;
}

async function bodyOf(response) {
  try {
    return await response.json();
  } catch {
    return {};
  }
}

function describe(body, fallback) {
  const detail = body && body.detail;
  if (typeof detail === "string") {
    return detail;
  }
  if (Array.isArray(detail)) {
    return detail.map((e) => e.msg || JSON.stringify(e)).join("; ");
  }
  return fallback;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function backoff(attempt) {
  const base = Math.min(250 * 2 ** attempt, MAX_BACKOFF_MS);
  return base / 2 + Math.random() * (base / 2);
}

function retryAfter(response, attempt) {
  const seconds = Number(response.headers.get("retry-after"));
  return Number.isFinite(seconds) && seconds > 0 ? Math.min(seconds * 1000, 30000) : backoff(attempt);
}

// Statuses worth another try: the service is busy, restarting, or behind a proxy that lost it for a moment.
function transient(status) {
  return status === 429 || status === 502 || status === 503 || status === 504;
}

function say(text, warn = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle("warn", warn);
}

function reconnecting(body) {
  if (body && body.code === "shutting_down") {
    say("The service is restarting (draining its streams); reconnecting…", true);
  } else {
    say("reconnecting…", true);
  }
}

// A token that is refused (expired, say) ends the session with a clear message; what is on screen stays.
function needSignIn(body) {
  state.generation++;
  setActive(null);
  dropToken();
  ui.signinMessage.textContent = body
    ? `Your session has ended: ${describe(body, "the token was refused")}. Sign in again to go on.`
    : "";
  ui.signin.hidden = false;
  say(body ? "Signed out" : "Sign in to start", Boolean(body));
  ui.tokenInput.focus();
}

// ---- rendering -------------------------------------------------------------------------------------------------

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  return node;
}

function formatMs(ms) {
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function nearBottom() {
  return window.innerHeight + window.scrollY >= document.body.scrollHeight - 80;
}

function keepInView(wasNearBottom) {
  if (wasNearBottom) {
    window.scrollTo(0, document.body.scrollHeight);
  }
}

function addUser(text) {
  const item = el("li", "message user");
  item.textContent = text;
  ui.messages.append(item);
  return item;
}

function toolItem(list, name, callId) {
  const item = el("li", "tool running");
  item.dataset.callId = callId;
  const label = el("span", "tool-name");
  label.textContent = `Tool ${name}`;
  const status = el("span", "tool-state");
  status.textContent = "running";
  item.append(label, ": ", status);
  list.append(item);
  return item;
}

function finishTool(item, elapsedMs) {
  item.classList.replace("running", "finished");
  item.querySelector(".tool-state").textContent =
    elapsedMs === undefined ? "finished" : `finished in ${formatMs(elapsedMs)}`;
}

function renderHistory(entries) {
  ui.messages.replaceChildren();
  let open = null;
  for (const entry of entries) {
    if (entry.role === "user") {
      open = null;
      addUser(entry.content);
      continue;
    }
    if (!open) {
      open = new AnswerView();
    }
    if (entry.role === "tool") {
      finishTool(toolItem(open.tools, entry.content.replace(/^Used tool /, ""), entry.tool_call_id));
    } else {
      open.text = entry.content;
      open.render();
      open = null;
    }
  }
}

const INTERRUPTED = {
  cancelled: "Stopped. The answer above is as far as it got.",
  shutdown: "Interrupted: the service stopped before the answer was finished.",
  detached: "Interrupted: nobody was reading the answer. Ask again to get a whole one.",
  deleted: "The chat was deleted.",
};

// One answer on screen: its tool calls, its text (Markdown), its usage and how it ended.
class AnswerView {
  constructor() {
    this.id = null;
    this.lastSeq = 0;
    this.text = "";
    this.dirty = false;
    this.ended = false;
    this.retryMs = 0;
    this.controller = new AbortController();
    this.toolItems = new Map();
    this.item = el("li", "message assistant");
    this.tools = el("ul", "tools");
    this.body = el("div", "body");
    this.usage = el("p", "usage");
    this.usage.hidden = true;
    this.notice = el("p", "notice");
    this.notice.hidden = true;
    this.item.append(this.tools, this.body, this.usage, this.notice);
    ui.messages.append(this.item);
  }

  // Applies one event; returns "done" or "reconnect" when the stream is over, else null.
  apply(seq, event) {
    if (seq !== null) {
      if (seq <= this.lastSeq) {
        return null;
      }
      this.lastSeq = seq;
    }
    switch (event.type) {
      case "run_started":
        this.id = event.run_id;
        this.item.dataset.runId = event.run_id;
        break;
      case "model_delta":
        this.text += event.content;
        this.dirty = true;
        break;
      case "tool_started":
        this.toolItems.set(event.tool_call_id, toolItem(this.tools, event.tool_name, event.tool_call_id));
        break;
      case "tool_finished": {
        const item =
          this.toolItems.get(event.tool_call_id) || toolItem(this.tools, event.tool_name, event.tool_call_id);
        finishTool(item, event.elapsed_ms);
        break;
      }
      case "final_answer":
        if (typeof event.output !== "string") {
          this.text = "```json\n" + JSON.stringify(event.output, null, 2) + "\n```";
          this.dirty = true;
        } else if (!this.text) {
          this.text = event.output;
          this.dirty = true;
        }
        if (event.usage) {
          const u = event.usage;
          this.usage.textContent = `Tokens: ${u.input_tokens} in, ${u.output_tokens} out, ${u.total_tokens} total`;
          this.usage.hidden = false;
        }
        break;
      case "run_failed":
        this.show(`Error (${event.code || "run_failed"}): ${event.error}`, true);
        break;
      case "run_interrupted":
        this.show(INTERRUPTED[event.reason] || `Interrupted (${event.reason}).`, event.reason !== "cancelled");
        break;
      case "reconnect":
        this.retryMs = event.retry_ms || 0;
        return "reconnect";
      case "done":
        this.ended = true;
        return "done";
      default:
        break;
    }
    return null;
  }

  show(text, error) {
    this.notice.textContent = text;
    this.notice.className = error ? "notice error" : "notice";
    this.notice.hidden = false;
  }

  render() {
    if (this.dirty || !this.body.hasChildNodes()) {
      const wasNearBottom = nearBottom();
      renderMarkdown(this.body, this.text);
      this.dirty = false;
      keepInView(wasNearBottom);
    }
  }
}

function setActive(view) {
  if (state.active && state.active !== view) {
    state.active.controller.abort();
    state.active.item.removeAttribute("aria-busy");
  }
  state.active = view;
  if (view) {
    // A screen reader announces the answer once it is complete, not at every piece.
    view.item.setAttribute("aria-busy", "true");
  }
  ui.stop.hidden = !view;
  ui.stop.disabled = false;
  ui.send.disabled = Boolean(view);
}

function finished(view) {
  view.render();
  view.item.removeAttribute("aria-busy");
  if (state.active === view) {
    setActive(null);
    say("");
  }
}

// ---- SSE over fetch ------------------------------------------------------------------------------------------

function parseBlock(block) {
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (line === "" || line.startsWith(":")) {
      continue;
    }
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) {
      value = value.slice(1);
    }
    if (field === "id") {
      id = value;
    } else if (field === "data") {
      data.push(value);
    }
  }
  if (!data.length) {
    return null;
  }
  let event;
  try {
    event = JSON.parse(data.join("\n"));
  } catch {
    return null;
  }
  let seq = null;
  if (id) {
    const n = Number(id.slice(id.lastIndexOf(":") + 1));
    if (Number.isSafeInteger(n)) {
      seq = n;
    }
  }
  return { seq, event };
}

// Reads a stream into `view`; "done", "reconnect", "cut" (ended without `done`) or "aborted".
async function consume(response, view) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        break;
      }
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let outcome = null;
      let end;
      while (!outcome && (end = buffer.indexOf("\n\n")) >= 0) {
        const parsed = parseBlock(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (parsed) {
          outcome = view.apply(parsed.seq, parsed.event);
        }
      }
      view.render();
      if (outcome) {
        reader.cancel().catch(() => {});
        return outcome;
      }
    }
  } catch {
    if (view.controller.signal.aborted) {
      return "aborted";
    }
  }
  view.render();
  return "cut";
}

// Follows `view`'s run to its end, attaching again after each cut with the last id shown.
async function follow(view) {
  const generation = state.generation;
  setActive(view);
  let attempt = 0;
  while (generation === state.generation && !view.ended) {
    const extra = { Accept: "text/event-stream" };
    if (view.lastSeq > 0) {
      extra["Last-Event-ID"] = `${view.id}:${view.lastSeq}`;
    }
    let response;
    try {
      response = await fetch(runPath(view.id, "/stream"), {
        headers: headers(extra),
        signal: view.controller.signal,
        cache: "no-store",
      });
    } catch {
      if (view.controller.signal.aborted) {
        return;
      }
      reconnecting();
      await sleep(backoff(attempt++));
      continue;
    }
    if (response.status === 401) {
      needSignIn(await bodyOf(response));
      return;
    }
    if (transient(response.status)) {
      reconnecting(await bodyOf(response));
      await sleep(retryAfter(response, attempt++));
      continue;
    }
    if (!response.ok) {
      view.show(describe(await bodyOf(response), `The answer cannot be shown (${response.status}).`), true);
      finished(view);
      return;
    }
    attempt = 0;
    say("");
    const outcome = await consume(response, view);
    if (outcome === "done" || outcome === "aborted") {
      break;
    }
    reconnecting();
    await sleep(outcome === "reconnect" ? view.retryMs : backoff(attempt++));
  }
  if (view.ended) {
    finished(view);
  }
}

async function ask(question, model) {
  const generation = state.generation;
  // The service's history has this many questions until this one arrives.
  const asked = ui.messages.querySelectorAll(".user").length;
  const user = addUser(question);
  ui.send.disabled = true;
  const putBack = () => {
    user.remove();
    if (!ui.question.value) {
      ui.question.value = question;
    }
    ui.send.disabled = false;
  };
  let response;
  for (let attempt = 0; ; ) {
    try {
      response = await fetch(chatPath("/stream"), {
        method: "POST",
        headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(model ? { question, model } : { question }),
        cache: "no-store",
      });
    } catch {
      // Whether the question arrived is unknown; once the service answers, the chat's history says.
      reconnecting();
      await sleep(backoff(attempt++));
      const chat = await fetchHistory(generation);
      if (!chat) {
        putBack();
        return;
      }
      if (chat.run || chat.messages.filter((m) => m.role === "user").length > asked) {
        user.remove();
        await openChat();
        return;
      }
      continue;
    }
    if (generation !== state.generation) {
      return;
    }
    if (response.status === 401) {
      putBack();
      needSignIn(await bodyOf(response));
      return;
    }
    if (transient(response.status)) {
      const body = await bodyOf(response);
      if (body.code === "shutting_down") {
        say("The service is restarting (draining its streams); sending again in a moment…", true);
      } else {
        say(`${describe(body, "The service is busy")}; sending again in a moment…`, true);
      }
      await sleep(retryAfter(response, attempt++));
      continue;
    }
    if (response.status === 409) {
      // An answer is still being written in this chat: show it instead.
      putBack();
      say("An answer is still being written in this chat.");
      await openChat();
      return;
    }
    if (!response.ok) {
      putBack();
      say(describe(await bodyOf(response), `The question was refused (${response.status}).`), true);
      return;
    }
    break;
  }
  say("");
  const view = new AnswerView();
  setActive(view);
  const outcome = await consume(response, view);
  if (outcome === "done") {
    finished(view);
    return;
  }
  if (outcome === "aborted") {
    return;
  }
  reconnecting();
  if (!view.id) {
    // Cut before the run said its id: the history knows whether it started.
    view.item.remove();
    setActive(null);
    await sleep(backoff(0));
    await openChat();
    return;
  }
  await sleep(outcome === "reconnect" ? view.retryMs : backoff(0));
  await follow(view);
}

// The chat's history, once the service answers: `{messages, run}`, or null when there is none to show (signed out, a
// newer load started, or an error the page says).
async function fetchHistory(generation) {
  let response;
  for (let attempt = 0; ; ) {
    try {
      response = await fetch(chatPath("/messages"), { headers: headers(), cache: "no-store" });
    } catch {
      reconnecting();
      await sleep(backoff(attempt++));
      if (generation !== state.generation) {
        return null;
      }
      continue;
    }
    if (!transient(response.status)) {
      break;
    }
    reconnecting(await bodyOf(response));
    await sleep(retryAfter(response, attempt++));
    if (generation !== state.generation) {
      return null;
    }
  }
  if (response.status === 401) {
    needSignIn(await bodyOf(response));
    return null;
  }
  if (response.status === 404 && !settings.needs_token) {
    // Dev mode: the chat is made on its first question.
    return { messages: [], run: null };
  }
  if (!response.ok) {
    say(describe(await bodyOf(response), `The chat cannot be shown (${response.status}).`), true);
    return null;
  }
  const chat = await response.json();
  return generation === state.generation ? chat : null;
}

async function openChat() {
  const generation = ++state.generation;
  setActive(null);
  // No question until the history is on screen: it would be drawn over.
  ui.send.disabled = true;
  const chat = await fetchHistory(generation);
  if (!chat) {
    return;
  }
  renderHistory(chat.messages);
  ui.send.disabled = false;
  say("");
  if (chat.run) {
    const view = new AnswerView();
    view.id = chat.run.id;
    view.item.dataset.runId = chat.run.id;
    await follow(view);
  }
}

// ---- Markdown, as DOM nodes only -----------------------------------------------------------------------------

const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

function safeUrl(raw) {
  try {
    const url = new URL(raw, location.href);
    return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

// Code spans, links, strong and emphasis (an underscore inside a word, or doubled inside one, is just text), autolinks.
const INLINE =
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|(!?)\[([^\]]*)\]\(\s*<?([^\s)>]*)>?(?:\s+"[^"]*")?\s*\)|\*\*(\S(?:[\s\S]*?\S)?)\*\*|(?<![A-Za-z0-9_])__(?!_)(\S(?:[\s\S]*?\S)?)(?<!_)__(?![A-Za-z0-9_])|\*([^\s*](?:[^*]*?[^\s*])?)\*|(?<![A-Za-z0-9_])_([^\s_](?:[^_]*?[^\s_])?)_(?![A-Za-z0-9_])|<(https?:\/\/[^\s>]+)>/;

function link(parent, href, label) {
  const a = el("a");
  a.href = href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  inline(a, label);
  parent.append(a);
}

function inline(parent, text) {
  let rest = text;
  while (rest) {
    const m = INLINE.exec(rest);
    if (!m) {
      parent.append(rest);
      return;
    }
    if (m.index) {
      parent.append(rest.slice(0, m.index));
    }
    if (m[1]) {
      const code = el("code");
      code.textContent = m[2];
      parent.append(code);
    } else if (m[4] !== undefined) {
      const href = safeUrl(m[5]);
      const label = m[3] ? `image: ${m[4] || m[5]}` : m[4] || m[5];
      if (href) {
        link(parent, href, label);
      } else {
        inline(parent, label);
      }
    } else if (m[6] || m[7]) {
      const strong = el("strong");
      inline(strong, m[6] || m[7]);
      parent.append(strong);
    } else if (m[8] || m[9]) {
      const em = el("em");
      inline(em, m[8] || m[9]);
      parent.append(em);
    } else if (m[10]) {
      const href = safeUrl(m[10]);
      if (href) {
        link(parent, href, m[10]);
      } else {
        parent.append(m[0]);
      }
    }
    rest = rest.slice(m.index + m[0].length);
  }
}

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+-]*)/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE = /^\s{0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^\s{0,3}>\s?/;
const ITEM = /^\s{0,3}([-*+]|\d{1,9}[.)])\s+(.*)$/;

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

function renderMarkdown(target, text) {
  const out = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      i++;
    } else if ((m = FENCE.exec(line))) {
      const close = new RegExp("^\\s{0,3}" + m[1][0] + "{" + m[1].length + ",}\\s*$");
      const code = [];
      i++;
      while (i < lines.length && !close.test(lines[i])) {
        code.push(lines[i++]);
      }
      i++;
      const pre = el("pre");
      const block = el("code", m[2] ? "language-" + m[2] : "");
      block.textContent = code.join("\n");
      pre.append(block);
      out.append(pre);
    } else if ((m = HEADING.exec(line))) {
      const heading = el("h" + Math.min(m[1].length + 2, 6));
      inline(heading, m[2]);
      out.append(heading);
      i++;
    } else if (RULE.test(line)) {
      out.append(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const quoted = [];
      while (i < lines.length && QUOTE.test(lines[i])) {
        quoted.push(lines[i++].replace(QUOTE, ""));
      }
      const quote = el("blockquote");
      renderMarkdown(quote, quoted.join("\n"));
      out.append(quote);
    } else if ((m = ITEM.exec(line))) {
      const ordered = /\d/.test(m[1]);
      const list = el(ordered ? "ol" : "ul");
      if (ordered && parseInt(m[1], 10) !== 1) {
        list.start = parseInt(m[1], 10);
      }
      while (i < lines.length) {
        const item = ITEM.exec(lines[i]);
        if (item && /\d/.test(item[1]) === ordered) {
          const li = el("li");
          inline(li, item[2]);
          list.append(li);
          i++;
        } else if (!item && /^\s{2,}\S/.test(lines[i]) && list.lastChild) {
          list.lastChild.append(el("br"));
          inline(list.lastChild, lines[i].trim());
          i++;
        } else {
          break;
        }
      }
      out.append(list);
    } else {
      const paragraph = el("p");
      let first = true;
      do {
        if (!first) {
          paragraph.append(el("br"));
        }
        inline(paragraph, lines[i++]);
        first = false;
      } while (i < lines.length && lines[i].trim() && !startsBlock(lines[i]));
      out.append(paragraph);
    }
  }
  target.replaceChildren(out);
}

// ---- the form ---------------------------------------------------------------------------------------------------

function fillModels() {
  for (const id of settings.models) {
    const option = el("option");
    option.value = id;
    option.textContent = id;
    ui.model.append(option);
  }
  ui.model.disabled = settings.models.length < 2;
}

ui.question.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.ask.requestSubmit();
  }
});

ui.ask.addEventListener("submit", (event) => {
  event.preventDefault();
  const question = ui.question.value.trim();
  if (!question || state.active || ui.send.disabled) {
    return;
  }
  ui.question.value = "";
  ask(question, ui.model.value);
});

ui.stop.addEventListener("click", async () => {
  const view = state.active;
  if (!view || !view.id) {
    return;
  }
  ui.stop.disabled = true;
  try {
    const response = await fetch(runPath(view.id, "/cancel"), { method: "POST", headers: headers() });
    if (response.status === 401) {
      needSignIn(await bodyOf(response));
    } else if (!response.ok && response.status !== 409) {
      say(describe(await bodyOf(response), "The answer could not be stopped."), true);
      ui.stop.disabled = false;
    }
  } catch {
    say("The service cannot be reached to stop the answer.", true);
    ui.stop.disabled = false;
  }
});

ui.signinForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const token = ui.tokenInput.value.trim();
  ui.tokenInput.value = "";
  if (token) {
    setToken(token);
    start();
  }
});

// ---- start ----------------------------------------------------------------------------------------------------

function start() {
  if (settings.needs_token && !state.token) {
    needSignIn(null);
    return;
  }
  ui.signin.hidden = true;
  ui.signinMessage.textContent = "";
  if (!state.chatId) {
    ui.chatMissing.hidden = false;
    say("");
    return;
  }
  ui.chatMissing.hidden = true;
  ui.chat.hidden = false;
  openChat();
}

fillModels();
loadToken();
loadChat();
announce();
start();
