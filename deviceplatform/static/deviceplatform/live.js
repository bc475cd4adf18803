/*
 * Live values on admin pages without reloading them.
 *
 * An element with `data-live-src="URL"` is a live area: its URL is polled every
 * `data-live-interval` seconds (default 3) while the page is visible. The URL answers JSON
 *
 *   {"values": {"KEY": {"html": "..."} | {"text": "..."}, ...}, "done": false}
 *
 * and every element inside the area with `data-live-key="KEY"` gets the value: "html" (markup
 * the server built and escaped, e.g. a progress bar) replaces its content, "text" its text.
 * Keys the answer does not name are left alone. `"done": true` (nothing left that can change)
 * stops the polling. The area's `data-live-status` says how it goes: "live", "done", "paused"
 * (the tab is hidden) or "error" (the last poll failed; it tries again, slower each time, up to
 * a minute), and an element inside it with `data-live-indicator` shows that to the operator.
 */
(function () {
  'use strict';

  var MAX_BACKOFF_MS = 60000;

  function pad(n) {
    return (n < 10 ? '0' : '') + n;
  }

  // "19:36:38 GMT+9": 24-hour with seconds and the browser's zone, as the admin's dates (dates.js).
  function clock(date) {
    var zone = '';
    try {
      var parts = new Intl.DateTimeFormat(undefined, { timeZoneName: 'short' }).formatToParts(date);
      for (var i = 0; i < parts.length; i++) {
        if (parts[i].type === 'timeZoneName') zone = ' ' + parts[i].value;
      }
    } catch (e) {
      zone = '';
    }
    return pad(date.getHours()) + ':' + pad(date.getMinutes()) + ':' + pad(date.getSeconds()) + zone;
  }

  function LiveArea(area) {
    this.area = area;
    this.url = area.getAttribute('data-live-src');
    var seconds = parseFloat(area.getAttribute('data-live-interval'));
    this.interval = (isFinite(seconds) && seconds >= 1 ? seconds : 3) * 1000;
    this.failures = 0;
    this.timer = null;
    this.busy = false;
    this.finished = false;
  }

  LiveArea.prototype.status = function (state, message) {
    this.area.setAttribute('data-live-status', state);
    var indicators = this.area.querySelectorAll('[data-live-indicator]');
    for (var i = 0; i < indicators.length; i++) {
      indicators[i].textContent = message;
      indicators[i].setAttribute('data-live-status', state);
    }
  };

  LiveArea.prototype.apply = function (values) {
    var nodes = this.area.querySelectorAll('[data-live-key]');
    for (var i = 0; i < nodes.length; i++) {
      var value = values[nodes[i].getAttribute('data-live-key')];
      if (!value) continue;
      if (typeof value.html === 'string') {
        if (nodes[i].innerHTML !== value.html) nodes[i].innerHTML = value.html;
      } else if (typeof value.text === 'string') {
        if (nodes[i].textContent !== value.text) nodes[i].textContent = value.text;
      }
    }
  };

  LiveArea.prototype.schedule = function (delay) {
    var self = this;
    clearTimeout(this.timer);
    if (!this.finished) this.timer = setTimeout(function () { self.poll(); }, delay);
  };

  LiveArea.prototype.poll = function () {
    var self = this;
    if (this.busy || this.finished) return;
    if (document.hidden) {
      this.status('paused', 'Live updates paused while the page is hidden');
      return; // visibilitychange polls again
    }
    this.busy = true;
    fetch(this.url, { credentials: 'same-origin', cache: 'no-store', headers: { Accept: 'application/json' } })
      .then(function (response) {
        if (!response.ok) throw new Error('HTTP ' + response.status);
        return response.json();
      })
      .then(function (body) {
        self.busy = false;
        self.failures = 0;
        self.apply(body.values || {});
        if (body.done) {
          self.finished = true;
          self.status('done', 'Finished: nothing left to change (' + clock(new Date()) + ')');
          return;
        }
        self.status('live', 'Live: updated ' + clock(new Date()));
        self.schedule(self.interval);
      })
      .catch(function (error) {
        self.busy = false;
        self.failures += 1;
        self.status('error', 'Live updates failing (' + error.message + '), retrying');
        self.schedule(Math.min(self.interval * Math.pow(2, self.failures), MAX_BACKOFF_MS));
      });
  };

  function start() {
    var areas = document.querySelectorAll('[data-live-src]');
    var live = [];
    for (var i = 0; i < areas.length; i++) {
      var area = new LiveArea(areas[i]);
      live.push(area);
      area.status('live', 'Live');
      area.schedule(area.interval);
    }
    document.addEventListener('visibilitychange', function () {
      if (document.hidden) return;
      for (var j = 0; j < live.length; j++) live[j].schedule(0);
    });
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
