// Keybrake dashboard: refresh the page's live regions ([data-live] with an id) every few
// seconds by fetching the same URL and swapping those regions' HTML, which the server has
// already escaped. Forms outside live regions keep what was typed. No dependencies.
(function () {
  "use strict";
  var INTERVAL_MS = 5000;
  var timer = null;

  function status(text, failed) {
    var el = document.getElementById("live-status");
    if (!el) return;
    el.textContent = text;
    el.className = failed ? "live failed" : "live";
  }

  function swap(html) {
    var doc = new DOMParser().parseFromString(html, "text/html");
    var regions = document.querySelectorAll("[data-live][id]");
    for (var i = 0; i < regions.length; i++) {
      var fresh = doc.getElementById(regions[i].id);
      if (fresh) regions[i].innerHTML = fresh.innerHTML;
    }
    var now = new Date();
    status("live · " + now.toLocaleTimeString(), false);
  }

  function refresh() {
    timer = null;
    if (document.hidden) return schedule();
    fetch(window.location.pathname + window.location.search, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { "X-Keybrake-Live": "1" }
    }).then(function (r) {
      if (r.status === 401) {
        window.location.assign("/login");
        return null;
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.text();
    }).then(function (html) {
      if (html !== null) swap(html);
    }).catch(function (e) {
      status("offline: " + e.message, true);
    }).then(schedule);
  }

  function schedule() {
    if (timer === null) timer = window.setTimeout(refresh, INTERVAL_MS);
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (document.querySelector("[data-live][id]")) schedule();
  });
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && timer === null) refresh();
  });
})();
