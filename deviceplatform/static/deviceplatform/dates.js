// Shows the admin's UTC dates and times ("2026-12-03 08:40:56 UTC", one text node each) in the
// browser's time zone, as <time> elements whose title is the UTC original. Text added later (live
// updates) is converted too. A page without JavaScript keeps the UTC text.
"use strict";
(function () {
  const UTC_TEXT = /^(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2}) UTC$/;
  const SKIP = "[data-utc], script, style, textarea, input, select, option, code, pre";
  const pad = (n) => String(n).padStart(2, "0");

  function zoneName(date) {
    try {
      const part = new Intl.DateTimeFormat(undefined, { timeZoneName: "short" })
        .formatToParts(date)
        .find((p) => p.type === "timeZoneName");
      if (part) return part.value;
    } catch (e) {
      // fall through to the numeric offset
    }
    const minutes = -date.getTimezoneOffset();
    const sign = minutes < 0 ? "-" : "+";
    return `UTC${sign}${pad(Math.floor(Math.abs(minutes) / 60))}:${pad(Math.abs(minutes) % 60)}`;
  }

  function local(date) {
    return (
      `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
      `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())} ` +
      zoneName(date)
    );
  }

  function convert(node) {
    const text = node.nodeValue.trim();
    const m = UTC_TEXT.exec(text);
    if (!m) return;
    const date = new Date(Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +m[6]));
    const time = document.createElement("time");
    time.dateTime = date.toISOString();
    time.dataset.utc = text;
    time.title = text;
    time.textContent = local(date);
    node.parentNode.replaceChild(time, node);
  }

  function localize(root) {
    if (root.nodeType === Node.TEXT_NODE) {
      if (root.parentElement && !root.parentElement.closest(SKIP)) convert(root);
      return;
    }
    if (root.nodeType !== Node.ELEMENT_NODE || root.closest(SKIP)) return;
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    const found = [];
    while (walker.nextNode()) {
      const node = walker.currentNode;
      if (UTC_TEXT.test(node.nodeValue.trim()) && !node.parentElement.closest(SKIP)) {
        found.push(node);
      }
    }
    found.forEach(convert);
  }

  function start() {
    localize(document.body);
    new MutationObserver((mutations) => {
      for (const mutation of mutations) {
        if (mutation.type === "characterData") localize(mutation.target);
        mutation.addedNodes.forEach(localize);
      }
    }).observe(document.body, { childList: true, subtree: true, characterData: true });
  }

  window.deviceplatformDates = { localize };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
