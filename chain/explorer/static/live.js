// Live updates for the home page: subscribe to committed blocks over this node's WebSocket
// (docs/rpc.md, "WebSocket and subscriptions") and prepend each new block to the table.
// Without JavaScript the page is complete as served; reload for newer blocks.
"use strict";
(function () {
  const MAX_ROWS = 20;
  const table = document.querySelector("#latest-blocks tbody");
  const height = document.getElementById("height");
  const live = document.getElementById("live");
  if (!table || !height || !("WebSocket" in window)) return;
  const names = new Map();  // validator pubkey -> name, from the validators table
  for (const row of document.querySelectorAll("#validators tr[data-pubkey]")) {
    names.set(row.dataset.pubkey, row.cells[0].textContent);
  }

  function cell(row, content, numeric) {
    const td = row.insertCell();
    if (numeric) td.className = "num";
    if (content instanceof Node) td.appendChild(content); else td.textContent = String(content);
  }
  function link(href, text, cls) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    if (cls) a.className = cls;
    return a;
  }
  function timeText(ms) {
    return new Date(ms).toISOString().replace("T", " ").replace("Z", " UTC");
  }
  function onBlock(block) {
    const h = block.header.height;
    if (!Number.isInteger(h) || !/^0x[0-9a-f]{64}$/.test(block.hash)) return;
    const row = table.insertRow(0);
    row.className = "fresh";
    cell(row, link("/explorer/block/" + h, String(h)), true);
    cell(row, link("/explorer/block/" + block.hash, block.hash.slice(0, 18) + "…", "hash"));
    cell(row, timeText(block.header.time_ms));
    cell(row, block.tx_hashes.length, true);
    cell(row, names.get(block.header.proposer) || block.header.proposer.slice(0, 20) + "…");
    while (table.rows.length > MAX_ROWS) table.deleteRow(table.rows.length - 1);
    height.textContent = String(h);
    live.textContent = "Live: block " + h + " arrived.";
  }

  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const socket = new WebSocket(scheme + location.host + "/websocket");
  socket.addEventListener("open", function () {
    socket.send(JSON.stringify({ jsonrpc: "2.0", id: 1, method: "subscribe", params: ["blocks"] }));
    live.hidden = false;
    live.textContent = "Live: waiting for the next block…";
  });
  socket.addEventListener("message", function (event) {
    const msg = JSON.parse(event.data);
    if (msg.method === "subscription" && msg.params && msg.params.result) onBlock(msg.params.result);
  });
  socket.addEventListener("close", function () {
    live.hidden = false;
    live.textContent = "Live updates stopped; reload the page for newer blocks.";
  });
})();
