/* counterlens report: filters, paging, method toggles, map opacity and going to a page. Plain
   JavaScript, no network. In the one-file report the cases live in inert <template> elements and
   only the cases of the page shown are cloned into the document, so their images are decoded
   only then ("templates" mode); a gallery page of a large run holds its cases as they are
   ("static" mode: filters and sorting apply to that page). User text is never parsed as HTML
   here: it arrives escaped in the page and is only compared as strings. */
(function () {
  "use strict";
  var byId = function (id) { return document.getElementById(id); };
  var list = function (nodes) { return Array.prototype.slice.call(nodes); };

  /* "page [n] go": open gallery page n (a file next to the others; a link, not a request) */
  list(document.querySelectorAll("input.goto-page")).forEach(function (input) {
    var go = function () {
      var n = parseInt(input.value, 10), pages = parseInt(input.getAttribute("data-pages"), 10);
      if (!(n >= 1 && n <= pages)) { input.value = String(Math.min(Math.max(n || 1, 1), pages)); return; }
      var digits = String(n);
      while (digits.length < 5) { digits = "0" + digits; }
      window.location.href = input.getAttribute("data-prefix") + digits + ".html";
    };
    input.addEventListener("keydown", function (event) { if (event.key === "Enter") { go(); } });
    var button = input.parentNode.querySelector("button.goto-go");
    if (button) { button.addEventListener("click", go); }
  });

  var gallery = byId("gallery");
  if (!gallery) { return; }
  var useTemplates = gallery.getAttribute("data-mode") === "templates";
  var all = useTemplates ? list(document.querySelectorAll("#case-store > template.case-data"))
    : list(gallery.querySelectorAll("article.case"));
  var pageSize = useTemplates ? (parseInt(gallery.getAttribute("data-page-size"), 10) || 24) : all.length || 1;
  var controls = {
    label: byId("f-label"), prediction: byId("f-prediction"), outcome: byId("f-outcome"),
    confMin: byId("f-conf-min"), confMax: byId("f-conf-max"), sort: byId("f-sort"),
    opacity: byId("f-opacity"), showCf: byId("f-show-cf"), reset: byId("f-reset"), allMaps: byId("f-all-maps")
  };
  var methodBoxes = list(document.querySelectorAll("input.method-toggle"));
  var pagers = list(document.querySelectorAll("[data-pager]"));
  var state = { matches: all, page: 0 };
  /* the map opacity the report was written with (counterlens report --alpha): where the sliders start */
  var startOpacity = Math.round(100 * (parseFloat(document.documentElement.getAttribute("data-map-opacity")) || 0.75));

  function startSliders(inputs) {
    inputs.forEach(function (input) {
      if (startOpacity % 5) { input.step = "1"; }
      input.value = String(startOpacity);
      var out = input.parentNode.querySelector("output");
      if (out) { out.textContent = input.value + "%"; }
    });
  }

  all.forEach(function (t, i) {
    var c = t.getAttribute("data-confidence");
    t.cl = { index: i, anchor: t.getAttribute("data-anchor"), label: t.getAttribute("data-label"),
             prediction: t.getAttribute("data-prediction"), outcome: t.getAttribute("data-outcome"),
             confidence: c === "" ? null : parseFloat(c) };
  });

  function matches(t) {
    var d = t.cl;
    if (controls.label.value !== "" && d.label !== controls.label.value) { return false; }
    if (controls.prediction.value !== "" && d.prediction !== controls.prediction.value) { return false; }
    if (controls.outcome.value !== "" && d.outcome !== controls.outcome.value) { return false; }
    var lo = Number(controls.confMin.value) / 100, hi = Number(controls.confMax.value) / 100;
    if (lo > 0 || hi < 1) {
      if (d.confidence === null || d.confidence < lo - 1e-9 || d.confidence > hi + 1e-9) { return false; }
    }
    return true;
  }

  function confKey(t, missing) { return t.cl.confidence === null ? missing : t.cl.confidence; }

  function applyFilters() {
    var found = all.filter(matches);
    var order = controls.sort.value;
    if (order === "conf-asc") {
      found.sort(function (a, b) { return confKey(a, 2) - confKey(b, 2) || a.cl.index - b.cl.index; });
    } else if (order === "conf-desc") {
      found.sort(function (a, b) { return confKey(b, -1) - confKey(a, -1) || a.cl.index - b.cl.index; });
    }
    state.matches = found;
    state.page = 0;
    render();
  }

  function fillCopies(root) {
    root.querySelectorAll("img[data-copy]").forEach(function (img) {
      var source = null;
      if (img.getAttribute("data-copy") === "case") {
        source = img.closest("article").querySelector("img.main");
      } else {
        source = img.closest("figure").querySelector("img.cf-orig");
      }
      if (source) { img.src = source.src; }
    });
  }

  function applyToggles(root) {
    var on = {};
    methodBoxes.forEach(function (box) { on[box.value] = box.checked; });
    root.querySelectorAll("figure.ov").forEach(function (fig) {
      fig.hidden = on[fig.getAttribute("data-method")] === false;
    });
    if (controls.allMaps && controls.allMaps.checked) {      /* the other maps of every case, opened */
      root.querySelectorAll("details.other-maps").forEach(function (d) { d.open = true; });
    }
    var showCf = !controls.showCf || controls.showCf.checked;
    root.querySelectorAll("figure.cf").forEach(function (fig) { fig.hidden = !showCf; });
  }

  function renderStatic() {
    var shown = {};
    state.matches.forEach(function (a) { shown[a.cl.index] = true; gallery.appendChild(a); });
    all.forEach(function (a) { a.hidden = !shown[a.cl.index]; if (!shown[a.cl.index]) { gallery.appendChild(a); } });
    byId("no-match").hidden = state.matches.length > 0;
    var count = byId("match-count");
    if (count) {
      count.textContent = state.matches.length === all.length ? all.length + " cases on this page."
        : state.matches.length + " of the " + all.length + " cases of this page match.";
    }
  }

  function render() {
    if (!useTemplates) { renderStatic(); return; }
    var total = state.matches.length;
    var pages = Math.max(1, Math.ceil(total / pageSize));
    state.page = Math.min(Math.max(0, state.page), pages - 1);
    var start = state.page * pageSize;
    var shown = state.matches.slice(start, start + pageSize);
    var fragment = document.createDocumentFragment();
    shown.forEach(function (t) { fragment.appendChild(document.importNode(t.content, true)); });
    fillCopies(fragment);
    applyToggles(fragment);
    startSliders(list(fragment.querySelectorAll("input.sv-opacity")));      /* the slice viewers' own */
    gallery.replaceChildren(fragment);
    byId("no-match").hidden = total > 0;
    var text = total === 0 ? "no case matches (" + all.length + " in the run)"
      : "cases " + (start + 1) + "\u2013" + (start + shown.length) + " of " + total +
        (total === all.length ? "" : " matching (" + all.length + " in the run)") +
        " \u00b7 page " + (state.page + 1) + " of " + pages;
    pagers.forEach(function (p) {
      p.querySelector(".count").textContent = text;
      p.querySelector("[data-step='-1']").disabled = state.page === 0;
      p.querySelector("[data-step='1']").disabled = state.page >= pages - 1;
    });
  }

  function showOutput(input, outputId) {
    var out = byId(outputId);
    if (out) { out.textContent = input.value + "%"; }
  }

  function setOpacity() {
    gallery.style.setProperty("--map-opacity", String(Number(controls.opacity.value) / 100));
    showOutput(controls.opacity, "o-opacity");
  }

  function clearFilters() {
    controls.label.value = ""; controls.prediction.value = ""; controls.outcome.value = "";
    controls.confMin.value = "0"; controls.confMax.value = "100"; controls.sort.value = "run";
    showOutput(controls.confMin, "o-conf-min"); showOutput(controls.confMax, "o-conf-max");
  }

  /* a link to #case-N (the "look first" lists, another page): show the page that holds it */
  function showCase() {
    var anchor = decodeURIComponent(window.location.hash.slice(1));
    if (anchor.indexOf("case-") !== 0) { return; }
    var target = null;
    all.forEach(function (t) { if (t.cl.anchor === anchor) { target = t; } });
    if (!target) { return; }
    if (state.matches.indexOf(target) < 0) { clearFilters(); applyFilters(); }
    if (useTemplates) {
      state.page = Math.floor(state.matches.indexOf(target) / pageSize);
      render();
    }
    var article = byId(anchor);
    if (article) { article.scrollIntoView(); }
  }

  [controls.label, controls.prediction, controls.outcome, controls.sort].forEach(function (el) {
    el.addEventListener("change", applyFilters);
  });
  controls.confMin.addEventListener("input", function () {
    if (Number(controls.confMin.value) > Number(controls.confMax.value)) { controls.confMax.value = controls.confMin.value; }
    showOutput(controls.confMin, "o-conf-min"); showOutput(controls.confMax, "o-conf-max"); applyFilters();
  });
  controls.confMax.addEventListener("input", function () {
    if (Number(controls.confMax.value) < Number(controls.confMin.value)) { controls.confMin.value = controls.confMax.value; }
    showOutput(controls.confMin, "o-conf-min"); showOutput(controls.confMax, "o-conf-max"); applyFilters();
  });
  methodBoxes.forEach(function (box) { box.addEventListener("change", function () { applyToggles(gallery); }); });
  if (controls.showCf) { controls.showCf.addEventListener("change", function () { applyToggles(gallery); }); }
  if (controls.allMaps) {
    controls.allMaps.addEventListener("change", function () {
      gallery.querySelectorAll("details.other-maps").forEach(function (d) { d.open = controls.allMaps.checked; });
    });
  }
  controls.opacity.addEventListener("input", setOpacity);
  controls.reset.addEventListener("click", function () { clearFilters(); applyFilters(); });
  pagers.forEach(function (p) {
    p.querySelectorAll("button[data-step]").forEach(function (button) {
      button.addEventListener("click", function () {
        state.page += parseInt(button.getAttribute("data-step"), 10);
        render();
        if (p !== pagers[0]) { pagers[0].scrollIntoView(); }
      });
    });
  });

  var confusion = byId("confusion");
  if (confusion && useTemplates) {
    confusion.addEventListener("click", function (event) {
      var cell = event.target.closest("td[data-label]");
      if (!cell || cell.classList.contains("zero")) { return; }
      controls.label.value = cell.getAttribute("data-label");
      controls.prediction.value = cell.getAttribute("data-prediction");
      controls.outcome.value = "";
      applyFilters();
      byId("cases").scrollIntoView();
    });
  }

  if (!useTemplates) { fillCopies(gallery); applyToggles(gallery); startSliders(list(gallery.querySelectorAll("input.sv-opacity"))); }
  startSliders([controls.opacity]);
  setOpacity();
  applyFilters();
  window.addEventListener("hashchange", showCase);
  document.addEventListener("click", function (event) {      /* the same link again: no hashchange */
    var link = event.target.closest("a[href^='#case-']");
    if (link && link.getAttribute("href") === window.location.hash) { showCase(); }
  });
  if (window.location.hash) { showCase(); }
}());
