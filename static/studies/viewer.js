// Series viewer: one server-rendered image per slice; wheel/keys/slider scroll, drag sets window/level.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("viewer-data").textContent);
  const root = document.getElementById("viewer");
  const stage = document.getElementById("stage");
  const image = document.getElementById("image");
  const slider = document.getElementById("slice");
  const overlaySlice = document.getElementById("overlay-slice");
  const overlayWindow = document.getElementById("overlay-window");
  const attributes = document.getElementById("attributes");
  const download = document.getElementById("download-instance");
  const presetButtons = Array.from(document.querySelectorAll(".presets button"));
  const slices = data.slices;
  if (!slices.length) return;

  let index = 0;
  let window_ = null; // [center, width] chosen by the user; null: the file's own
  let pending = null; // the URL wanted while another image is loading
  let loading = false;

  function summary(i) { return data.summaries[slices[i].sop]; }

  function frameUrl(i, win) {
    const s = slices[i];
    let url = root.dataset.frameUrl.replace("SOP", encodeURIComponent(s.sop)).replace(/\/0$/, "/" + s.frame);
    if (win) url += "?wc=" + Math.round(win[0]) + "&ww=" + Math.max(1, Math.round(win[1]));
    return url;
  }

  function effectiveWindow() {
    return window_ || (summary(index).window);
  }

  function show(url) {
    // One request at a time: while dragging, only the latest window is fetched.
    if (loading) { pending = url; return; }
    loading = true;
    image.src = url;
  }
  image.addEventListener("load", done);
  image.addEventListener("error", done);
  function done() {
    loading = false;
    image.dataset.loaded = image.getAttribute("src");
    if (pending && pending !== image.getAttribute("src")) { const next = pending; pending = null; show(next); }
    else pending = null;
  }

  function prefetch(i) {
    if (i < 0 || i >= slices.length) return;
    const img = new Image();
    img.src = frameUrl(i, window_);
  }

  function render() {
    const s = slices[index];
    const info = summary(index);
    show(frameUrl(index, window_));
    slider.value = index + 1;
    overlaySlice.textContent = "Image " + (index + 1) + " / " + slices.length + (info.frames > 1 ? "  (frame " + (s.frame + 1) + ")" : "");
    const win = info.grayscale ? effectiveWindow() : null;
    overlayWindow.textContent = win ? "WL " + Math.round(win[0]) + "  WW " + Math.round(win[1]) : "";
    root.dataset.index = String(index);
    download.href = root.dataset.downloadUrl.replace("SOP", encodeURIComponent(s.sop));
    attributes.replaceChildren(...info.attributes.map(function (pair) {
      const row = document.createElement("div");
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = pair[0];
      dd.textContent = pair[1];
      row.append(dt, dd);
      return row;
    }));
    prefetch(index + 1);
    prefetch(index - 1);
  }

  function go(i) {
    const next = Math.max(0, Math.min(slices.length - 1, i));
    if (next !== index) { index = next; render(); }
  }

  function setWindow(win, activeButton) {
    window_ = win;
    presetButtons.forEach(function (b) { b.classList.toggle("active", b === activeButton); });
    render();
  }

  stage.addEventListener("wheel", function (event) {
    event.preventDefault();
    go(index + (event.deltaY > 0 ? 1 : -1));
  }, { passive: false });

  document.addEventListener("keydown", function (event) {
    if (event.target.closest("input, select, textarea")) return;
    const page = Math.max(1, Math.round(slices.length / 10));
    const keys = { ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1, PageDown: page, PageUp: -page, j: 1, k: -1 };
    if (event.key in keys) { event.preventDefault(); go(index + keys[event.key]); }
    else if (event.key === "Home") { event.preventDefault(); go(0); }
    else if (event.key === "End") { event.preventDefault(); go(slices.length - 1); }
    else if (/^[0-9]$/.test(event.key) && presetButtons[Number(event.key)]) presetButtons[Number(event.key)].click();
  });

  slider.addEventListener("input", function () { go(Number(slider.value) - 1); });

  presetButtons.forEach(function (button) {
    button.addEventListener("click", function () {
      if (button.dataset.preset === "default") setWindow(null, button);
      else setWindow([Number(button.dataset.center), Number(button.dataset.width)], button);
    });
  });

  // Drag: horizontal changes the width (contrast), vertical the level (brightness).
  let drag = null;
  stage.addEventListener("pointerdown", function (event) {
    if (!summary(index).grayscale) return;
    const start = effectiveWindow() || [128, 256];
    drag = { x: event.clientX, y: event.clientY, center: start[0], width: start[1] };
    stage.setPointerCapture(event.pointerId);
    stage.focus();
  });
  stage.addEventListener("pointermove", function (event) {
    if (!drag) return;
    const scale = Math.max(drag.width / 200, 1);
    const width = Math.max(1, drag.width + (event.clientX - drag.x) * scale);
    const center = drag.center + (event.clientY - drag.y) * scale;
    window_ = [center, width];
    presetButtons.forEach(function (b) { b.classList.remove("active"); });
    render();
  });
  function endDrag() { drag = null; }
  stage.addEventListener("pointerup", endDrag);
  stage.addEventListener("pointercancel", endDrag);

  render();
  stage.focus();
})();
