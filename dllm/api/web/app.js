// dllm chat page: streams /v1/chat/completions over SSE. Model text is only ever set with
// textContent, never innerHTML, so whatever the model writes is shown as text, not markup.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], controller: null };

function addMessage(role, text) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  el.textContent = text;
  $("messages").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").hidden = !on;
}

async function loadModel() {
  $("base").textContent = `${location.origin}/v1`;
  try {
    const r = await fetch("/v1/models");
    const body = await r.json();
    state.model = body.data[0].id;
    $("model").textContent = state.model;
  } catch (e) {
    $("model").textContent = "model unavailable";
  }
}

// The answer to a refused request: the rate-limit message, the payment hint, or the API error.
async function refusal(r) {
  let message = `HTTP ${r.status}`;
  try {
    const body = await r.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON (e.g. a proxy page): keep the status line */ }
  if (r.status === 429) {
    const wait = r.headers.get("Retry-After");
    return `Rate limit reached: free use is limited per IP. Try again in ${wait || "a few"} seconds.`;
  }
  if (r.status === 402) return "Free limit reached: this server accepts payment (x402) for more requests.";
  return `Error: ${message}`;
}

// Yields parsed SSE `data:` payloads; "[DONE]" ends the stream.
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function showSpeed(tokens, seconds) {
  if (tokens > 0 && seconds > 0) $("tps").textContent = `${(tokens / seconds).toFixed(1)} tokens/s`;
}

async function send(text) {
  notice("");
  if (!state.model) await loadModel();
  addMessage("user", text);
  state.history.push({ role: "user", content: text });
  const out = addMessage("assistant", "");
  out.classList.add("streaming");
  busy(true);
  state.controller = new AbortController();
  let answer = "", chunks = 0, tFirst = null, usage = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: state.model, messages: state.history, stream: true, temperature: 0.7,
                             stream_options: { include_usage: true } }),
      signal: state.controller.signal,
    });
    if (!r.ok) {
      out.remove();
      state.history.pop();
      notice(await refusal(r));
      return;
    }
    for await (const chunk of sseEvents(r.body)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (tFirst === null) tFirst = performance.now();
        chunks += 1;
        answer += delta.content;
        out.textContent = answer;
        showSpeed(chunks, (performance.now() - tFirst) / 1000);
        out.scrollIntoView({ block: "end" });
      }
    }
    if (usage && tFirst !== null) showSpeed(usage.completion_tokens, (performance.now() - tFirst) / 1000);
    state.history.push({ role: "assistant", content: answer });
  } catch (e) {
    if (e.name === "AbortError") {
      state.history.push({ role: "assistant", content: answer });
    } else {
      addMessage("error", `Error: ${e.message}`);
      state.history.pop();
    }
  } finally {
    out.classList.remove("streaming");
    out.dataset.done = "1";
    busy(false);
    state.controller = null;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  loadModel();
  $("chat").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || $("send").disabled) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("chat").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
});
