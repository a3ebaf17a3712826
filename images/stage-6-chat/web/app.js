"use strict";
// Minimal chat client: posts a question, appends the answer.
const log = document.getElementById("log");
const add = (who, text) => {
  const li = document.createElement("li");
  li.className = who;
  li.textContent = text;
  log.appendChild(li);
};
document.getElementById("ask").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const q = document.getElementById("q");
  const text = q.value.trim();
  if (!text) return;
  add("you", text);
  q.value = "";
  try {
    const res = await fetch("/api/chat", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ message: text }),
    });
    const body = await res.json();
    add("op-dbus", body.reply ?? JSON.stringify(body));
  } catch (err) {
    add("error", String(err));
  }
});
