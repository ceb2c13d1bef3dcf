// slimserve's chat page: plain JavaScript over the same /v1/chat/completions API as any client.
// Conversations and settings live in the browser's local storage; nothing is sent anywhere else.
"use strict";

const STORE = "slimserve.chat.v1";
const $ = (sel) => document.querySelector(sel);

const state = load();
let running = null; // {controller, conv, msg} while an answer streams

function load() {
  let saved = null;
  try {
    saved = JSON.parse(localStorage.getItem(STORE));
  } catch (e) {
    saved = null;
  }
  const settings = { system: "", temperature: 0.7, top_p: 1, max_tokens: "", seed: "", schema: "", api_key: "" };
  if (!saved || !Array.isArray(saved.conversations)) {
    return { conversations: [], current: null, settings };
  }
  saved.settings = Object.assign(settings, saved.settings || {});
  return saved;
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(state));
}

function uid() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

function current() {
  return state.conversations.find((c) => c.id === state.current) || null;
}

function newConversation() {
  const conv = { id: uid(), title: "New chat", created: Date.now(), messages: [] };
  state.conversations.unshift(conv);
  state.current = conv.id;
  save();
  render();
  $("#input").focus();
  return conv;
}

// ---- Markdown: the text is escaped first, so nothing the model writes becomes HTML ----

function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

function inline(s) {
  // `s` is escaped already.
  const codes = [];
  s = s.replace(/`([^`\n]+)`/g, (_, c) => {
    codes.push(c);
    return "\u0000" + (codes.length - 1) + "\u0000";
  });
  s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
  s = s.replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>");
  s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => "<code>" + codes[+i] + "</code>");
}

function blocks(text) {
  // Paragraphs, headings and lists of a stretch with no code fence in it.
  const out = [];
  let list = null;
  let para = [];
  const flushPara = () => {
    if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
    para = [];
  };
  const flushList = () => {
    if (list) out.push("<" + list.tag + ">" + list.items.map((i) => "<li>" + inline(i) + "</li>").join("") + "</" + list.tag + ">");
    list = null;
  };
  for (const line of escapeHtml(text).split("\n")) {
    let m;
    if (!line.trim()) {
      flushPara();
      flushList();
    } else if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
      flushPara();
      flushList();
      const level = Math.min(m[1].length + 2, 6);
      out.push("<h" + level + ">" + inline(m[2]) + "</h" + level + ">");
    } else if ((m = line.match(/^\s*(?:([-*+])|(\d+)[.)])\s+(.*)$/))) {
      flushPara();
      const tag = m[1] ? "ul" : "ol";
      if (!list || list.tag !== tag) {
        flushList();
        list = { tag, items: [] };
      }
      list.items.push(m[3]);
    } else {
      flushList();
      para.push(line);
    }
  }
  flushPara();
  flushList();
  return out.join("");
}

function markdown(src) {
  // Fenced code blocks alternate with prose; an unclosed fence (mid-stream) is code to the end.
  const parts = src.split(/^```/m);
  let html = "";
  parts.forEach((part, i) => {
    if (i % 2 === 0) {
      html += blocks(part);
      return;
    }
    const nl = part.indexOf("\n");
    const lang = nl < 0 ? part : part.slice(0, nl);
    const code = nl < 0 ? "" : part.slice(nl + 1).replace(/\n$/, "");
    const cls = /^[\w+-]+$/.test(lang.trim()) ? ' class="language-' + lang.trim() + '"' : "";
    html += "<pre><code" + cls + ">" + escapeHtml(code) + "</code></pre>";
  });
  return html;
}

// ---- Rendering ----

function render() {
  const list = $("#conversations");
  list.textContent = "";
  for (const conv of state.conversations) {
    const li = document.createElement("li");
    li.className = conv.id === state.current ? "current" : "";
    li.dataset.id = conv.id;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = conv.title;
    name.title = conv.title;
    name.onclick = () => {
      state.current = conv.id;
      save();
      $("#app").classList.remove("show-sidebar");
      render();
    };
    const rename = button("Rename", "rename", () => {
      const title = prompt("Name this conversation", conv.title);
      if (title && title.trim()) {
        conv.title = title.trim();
        save();
        render();
      }
    });
    const del = button("Delete", "delete", () => {
      if (running && running.conv === conv) stop();
      state.conversations = state.conversations.filter((c) => c !== conv);
      if (state.current === conv.id) state.current = state.conversations.length ? state.conversations[0].id : null;
      save();
      render();
    });
    li.append(name, rename, del);
    list.append(li);
  }
  const conv = current();
  $("#title").textContent = conv ? conv.title : "slimserve";
  renderMessages();
}

function button(label, cls, onclick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.className = cls;
  b.onclick = onclick;
  return b;
}

function renderMessages() {
  const box = $("#messages");
  const conv = current();
  box.textContent = "";
  if (!conv || !conv.messages.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "Ask anything. The answer streams from this server's model.";
    box.append(empty);
    return;
  }
  conv.messages.forEach((msg, i) => box.append(messageNode(conv, msg, i)));
  box.scrollTop = box.scrollHeight;
}

function messageNode(conv, msg, i) {
  const node = document.createElement("div");
  node.className = "msg " + msg.role;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  if (msg.role === "user") bubble.textContent = msg.content;
  else bubble.innerHTML = markdown(msg.content);
  node.append(bubble);
  const meta = document.createElement("div");
  meta.className = "meta";
  if (msg.error) {
    const err = document.createElement("span");
    err.className = "error";
    err.textContent = msg.error;
    meta.append(err);
  }
  if (msg.stats) {
    const s = msg.stats;
    const stats = document.createElement("span");
    stats.className = "stats";
    const parts = [s.tokens + " tokens"];
    if (s.tokens_per_s != null) parts.push(s.tokens_per_s.toFixed(1) + " tok/s");
    if (s.ttft_s != null) parts.push("first token " + s.ttft_s.toFixed(2) + " s");
    if (s.stopped) parts.push("stopped");
    stats.textContent = parts.join(" · ");
    meta.append(stats);
  }
  const busy = running !== null;
  if (msg.role === "user" && !busy) meta.append(button("Edit", "edit", () => editMessage(conv, i, node)));
  if (msg.role === "assistant" && i === conv.messages.length - 1 && !busy) {
    meta.append(button("Regenerate", "regenerate", () => {
      conv.messages.pop();
      save();
      answer(conv);
    }));
  }
  if (meta.childNodes.length) node.append(meta);
  return node;
}

function editMessage(conv, i, node) {
  const area = document.createElement("textarea");
  area.className = "edit";
  area.value = conv.messages[i].content;
  area.rows = Math.min(12, area.value.split("\n").length + 1);
  const send = button("Send", "resend", () => {
    const text = area.value.trim();
    if (!text) return;
    conv.messages = conv.messages.slice(0, i);
    conv.messages.push({ role: "user", content: text });
    save();
    answer(conv);
  });
  const cancel = button("Cancel", "cancel", renderMessages);
  node.textContent = "";
  node.append(area, send, cancel);
  area.focus();
}

// ---- Talking to the server ----

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.settings.api_key) h["Authorization"] = "Bearer " + state.settings.api_key;
  return h;
}

function requestBody(conv) {
  const s = state.settings;
  const messages = [];
  if (s.system.trim()) messages.push({ role: "system", content: s.system });
  for (const m of conv.messages) messages.push({ role: m.role, content: m.content });
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if (s.temperature !== "" && s.temperature != null) body.temperature = Number(s.temperature);
  if (s.top_p !== "" && s.top_p != null) body.top_p = Number(s.top_p);
  if (s.max_tokens !== "" && s.max_tokens != null) body.max_tokens = Number(s.max_tokens);
  if (s.seed !== "" && s.seed != null) body.seed = Number(s.seed);
  if (s.schema.trim()) {
    body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: JSON.parse(s.schema) } };
  }
  return body;
}

async function errorText(res) {
  let message = "HTTP " + res.status;
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) {
    /* not JSON: keep the status */
  }
  const retry = res.headers.get("Retry-After");
  if (retry) message += " (retry after " + retry + " s)";
  return message;
}

async function answer(conv) {
  const msg = { role: "assistant", content: "" };
  let body;
  try {
    body = requestBody(conv);
  } catch (e) {
    msg.error = "The JSON schema in settings is not valid JSON: " + e.message;
    conv.messages.push(msg);
    save();
    renderMessages();
    return;
  }
  conv.messages.push(msg);
  const controller = new AbortController();
  running = { controller, conv, msg };
  setBusy(true);
  renderMessages();
  const t0 = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  let stopped = false;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) throw new Error(await errorText(res));
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let done = false;
    while (!done) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") {
            done = true;
            break;
          }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (first === null) first = performance.now();
            chunks += 1;
            msg.content += delta.content;
            updateLast(msg);
          }
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else msg.error = e.message || String(e);
  }
  const t1 = performance.now();
  const tokens = usage ? usage.completion_tokens : chunks;
  msg.stats = {
    tokens,
    ttft_s: first === null ? null : (first - t0) / 1000,
    tokens_per_s: first !== null && t1 > first && tokens > 1 ? (tokens - 1) / ((t1 - first) / 1000) : null,
    stopped,
  };
  if (!msg.content && !msg.error && !stopped) msg.error = "The model returned an empty answer.";
  if (conv.title === "New chat" && conv.messages.length) {
    conv.title = conv.messages[0].content.slice(0, 40) || "New chat";
  }
  running = null;
  setBusy(false);
  save();
  render();
}

function updateLast(msg) {
  const nodes = document.querySelectorAll("#messages .msg.assistant .bubble");
  const node = nodes[nodes.length - 1];
  if (!node) return;
  node.innerHTML = markdown(msg.content);
  const box = $("#messages");
  box.scrollTop = box.scrollHeight;
}

function stop() {
  if (running) running.controller.abort();
}

function setBusy(busy) {
  $("#send").hidden = busy;
  $("#stop").hidden = !busy;
}

function send() {
  const text = $("#input").value.trim();
  if (!text || running) return;
  const conv = current() || newConversation();
  conv.messages.push({ role: "user", content: text });
  $("#input").value = "";
  save();
  answer(conv);
}

// ---- Settings and wiring ----

const SETTINGS = {
  system: "#set-system", temperature: "#set-temperature", top_p: "#set-top-p",
  max_tokens: "#set-max-tokens", seed: "#set-seed", schema: "#set-schema", api_key: "#set-api-key",
};

function wireSettings() {
  for (const [key, sel] of Object.entries(SETTINGS)) {
    const el = $(sel);
    el.value = state.settings[key] ?? "";
    el.addEventListener("input", () => {
      state.settings[key] = el.value;
      const err = $("#settings-error");
      err.hidden = true;
      if (key === "schema" && el.value.trim()) {
        try {
          JSON.parse(el.value);
        } catch (e) {
          err.textContent = "JSON schema: " + e.message;
          err.hidden = false;
        }
      }
      save();
      if (key === "api_key") showModel();
    });
  }
}

function exportAll() {
  const blob = new Blob([JSON.stringify(state.conversations, null, 2)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "slimserve-conversations.json";
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

async function showModel() {
  try {
    const res = await fetch("/props", { headers: headers() });
    if (!res.ok) return;
    const p = await res.json();
    $("#model-info").textContent = p.model + " · context " + p.max_model_len + " tokens · " + p.quantization;
  } catch (e) {
    /* the page works without it */
  }
}

$("#composer").addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
$("#input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
$("#stop").addEventListener("click", stop);
$("#new-chat").addEventListener("click", newConversation);
$("#export").addEventListener("click", exportAll);
$("#toggle-sidebar").addEventListener("click", () => $("#app").classList.add("show-sidebar"));
$("#close-sidebar").addEventListener("click", () => $("#app").classList.remove("show-sidebar"));
// On a phone the list covers the chat: a tap on the chat closes it.
$("main").addEventListener("click", (e) => {
  if (e.target.id !== "toggle-sidebar") $("#app").classList.remove("show-sidebar");
});
wireSettings();
// An answer cut off by a reload is kept as it was, marked stopped.
for (const conv of state.conversations) {
  for (const m of conv.messages) if (m.role === "assistant" && !m.stats && !m.error) m.stats = { tokens: 0, stopped: true };
}
render();
showModel();
