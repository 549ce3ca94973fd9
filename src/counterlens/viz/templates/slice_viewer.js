/* counterlens report: the slice viewer of 3-D cases (templates/slice_viewer.html). Each plane is a
   sprite of tiles; a slice is shown by moving the layers' background-position. Events are
   delegated from the document, so viewers cloned into the page later (paged gallery) work too.
   Plain JavaScript, no network, no HTML parsing. */
(function () {
  "use strict";
  var list = function (nodes) { return Array.prototype.slice.call(nodes); };

  function visiblePlane(viewer) {
    return list(viewer.querySelectorAll(".sv-plane")).filter(function (p) { return !p.hidden; })[0];
  }

  function methodIndex(viewer) {
    var select = viewer.querySelector(".sv-method");
    return select ? parseInt(select.value, 10) : -1;
  }

  function showSlice(viewer, plane, k) {
    var n = parseInt(plane.getAttribute("data-n"), 10), cols = parseInt(plane.getAttribute("data-cols"), 10),
      rows = parseInt(plane.getAttribute("data-rows"), 10);
    k = Math.max(0, Math.min(n - 1, k | 0));
    var r = Math.floor(k / cols), c = k % cols;
    var pos = (cols > 1 ? 100 * c / (cols - 1) : 0) + "% " + (rows > 1 ? 100 * r / (rows - 1) : 0) + "%";
    list(plane.querySelectorAll(".sv-layer")).forEach(function (layer) { layer.style.backgroundPosition = pos; });
    plane.setAttribute("data-slice", String(k));
    var slider = viewer.querySelector(".sv-slider"), out = viewer.querySelector(".sv-pos");
    slider.max = String(n - 1);
    slider.value = String(k);
    out.textContent = (k + 1) + " / " + n;
  }

  function peakOf(plane, m) {
    var peaks = (plane.getAttribute("data-peaks") || "").split(" ");
    var k = parseInt(peaks[m >= 0 ? m : 0], 10);
    return isNaN(k) ? Math.floor(parseInt(plane.getAttribute("data-n"), 10) / 2) : k;
  }

  function setPlane(viewer, name) {
    list(viewer.querySelectorAll(".sv-plane")).forEach(function (p) { p.hidden = p.getAttribute("data-plane") !== name; });
    list(viewer.querySelectorAll(".sv-plane-btn")).forEach(function (b) {
      var on = b.getAttribute("data-plane") === name;
      b.classList.toggle("on", on);
      b.setAttribute("aria-pressed", on ? "true" : "false");
    });
    var plane = visiblePlane(viewer);
    showSlice(viewer, plane, parseInt(plane.getAttribute("data-slice"), 10));
  }

  function setMethod(viewer) {
    var m = methodIndex(viewer);
    list(viewer.querySelectorAll(".sv-map, .sv-scale")).forEach(function (el) {
      el.hidden = parseInt(el.getAttribute("data-method"), 10) !== m;
    });
  }

  document.addEventListener("input", function (event) {
    var t = event.target, viewer = t.closest ? t.closest("figure.sv") : null;
    if (!viewer) { return; }
    if (t.classList.contains("sv-slider")) {
      showSlice(viewer, visiblePlane(viewer), parseInt(t.value, 10));
    } else if (t.classList.contains("sv-opacity")) {
      viewer.style.setProperty("--sv-opacity", String(Number(t.value) / 100));
      viewer.querySelector(".sv-opacity-out").textContent = t.value + "%";
    }
  });

  document.addEventListener("change", function (event) {
    var t = event.target, viewer = t.closest ? t.closest("figure.sv") : null;
    if (viewer && t.classList.contains("sv-method")) { setMethod(viewer); }
  });

  document.addEventListener("click", function (event) {
    var t = event.target, viewer = t.closest ? t.closest("figure.sv") : null;
    if (!viewer) { return; }
    if (t.classList.contains("sv-plane-btn")) {
      setPlane(viewer, t.getAttribute("data-plane"));
    } else if (t.classList.contains("sv-peak")) {
      var plane = visiblePlane(viewer);
      showSlice(viewer, plane, peakOf(plane, methodIndex(viewer)));
    }
  });

  document.addEventListener("wheel", function (event) {
    var view = event.target.closest ? event.target.closest(".sv-view") : null;
    if (!view) { return; }
    event.preventDefault();
    var viewer = view.closest("figure.sv"), plane = visiblePlane(viewer);
    showSlice(viewer, plane, parseInt(plane.getAttribute("data-slice"), 10) + (event.deltaY > 0 ? 1 : -1));
  }, { passive: false });
}());
