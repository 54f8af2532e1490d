// Keybrake dashboard: refresh the page's live regions ([data-live] with an id) every few
// seconds by fetching the same URL and swapping those regions' HTML, which the server has
// already escaped. Forms outside live regions keep what was typed. No dependencies.
//
// The page is served by the proxy it watches: when a refresh fails (the proxy is down, hung
// or answers with an error) the page says so at once, a banner and greyed-out figures, rather
// than go on showing the last numbers as if they were live. Forms with data-confirm ask first.
(function () {
  "use strict";
  // keybrake_dashboard_refresh (seconds), written into the page by the proxy.
  var INTERVAL_MS = Number(document.body.getAttribute("data-refresh-ms")) || 5000;
  // A hung proxy accepts connections and never answers: a refresh gives up after this long.
  var TIMEOUT_MS = Math.min(INTERVAL_MS, 5000);
  var timer = null;
  var fresh = new Date(); // when the figures on the page were last known good

  function clock(t) {
    return t.toLocaleTimeString();
  }

  function status(text, failed) {
    var el = document.getElementById("live-status");
    if (!el) return;
    el.textContent = text;
    el.className = failed ? "live failed" : "live";
  }

  function markStale(stale) {
    document.body.classList.toggle("offline", stale);
    var regions = document.querySelectorAll("[data-live][id]");
    for (var i = 0; i < regions.length; i++) {
      if (stale) regions[i].setAttribute("aria-busy", "true");
      else regions[i].removeAttribute("aria-busy");
    }
  }

  function offline(what, why) {
    var banner = document.getElementById("offline");
    if (banner) {
      banner.querySelector(".what").textContent = what;
      banner.querySelector(".why").textContent = why;
      banner.querySelector(".since").textContent = clock(fresh);
      banner.hidden = false;
    }
    markStale(true);
    status("offline · since " + clock(fresh), true);
  }

  function online() {
    var banner = document.getElementById("offline");
    if (banner) banner.hidden = true;
    markStale(false);
    fresh = new Date();
    status("live · " + clock(fresh), false);
  }

  function swap(html) {
    var doc = new DOMParser().parseFromString(html, "text/html");
    var regions = document.querySelectorAll("[data-live][id]");
    for (var i = 0; i < regions.length; i++) {
      var region = doc.getElementById(regions[i].id);
      if (region) regions[i].innerHTML = region.innerHTML;
    }
    online();
  }

  function HttpError(response, text) {
    this.response = response;
    this.text = text;
  }

  function refresh() {
    timer = null;
    if (document.hidden) return schedule();
    var abort = new AbortController();
    var limit = window.setTimeout(function () { abort.abort(); }, TIMEOUT_MS);
    fetch(window.location.pathname + window.location.search, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { "X-Keybrake-Live": "1" },
      signal: abort.signal
    }).then(function (r) {
      if (r.status === 401) {
        window.location.assign("/login");
        return null;
      }
      return r.text().then(function (text) {
        if (!r.ok) throw new HttpError(r, text);
        return text;
      });
    }).then(function (html) {
      if (html !== null) swap(html);
    }).catch(function (e) {
      if (e instanceof HttpError) {
        var detail = e.text.length < 200 && e.text.indexOf("<") < 0 ? ": " + e.text.trim() : "";
        offline("Keybrake answered with an error", "HTTP " + e.response.status + detail);
      } else if (e && e.name === "AbortError") {
        offline("Keybrake is not answering", "no answer within " + TIMEOUT_MS / 1000 + " s");
      } else {
        offline("Keybrake is not answering", "cannot connect");
      }
    }).then(function () {
      window.clearTimeout(limit);
      schedule();
    });
  }

  function schedule() {
    if (timer === null) timer = window.setTimeout(refresh, INTERVAL_MS);
  }

  document.addEventListener("submit", function (e) {
    var question = e.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) e.preventDefault();
  });
  document.addEventListener("DOMContentLoaded", function () {
    if (document.querySelector("[data-live][id]")) schedule();
  });
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && timer === null) refresh();
  });
})();
