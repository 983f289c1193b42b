/* handseg report: draws the per-image table (sort, filter, class) and the image viewer (side-by-side
   panels, one class or all, masks or differences, opacity, zoom and pan) from the JSON in #hs-data.
   Plain JavaScript, no libraries; works from file:// (it only shows images, it never reads pixels).
   The viewer opens from the address too: index.html#image=NAME&class=Lunate&view=diff */
(function () {
  "use strict";
  var source = document.getElementById("hs-data");
  var host = document.getElementById("hs-images");
  if (!source || !host) return;
  var D = JSON.parse(source.textContent);
  var rows = D.rows, columns = D.columns, classes = D.classes;
  var byName = {};
  rows.forEach(function (r, i) { r.index = i; byName[r.image] = r; });
  var hasDice = columns.some(function (c) { return c.dice; });
  var hasDiff = D.panels.some(function (p) { return p.diff; });
  var table = {sort: null, desc: false, filter: "", cls: -1, shown: rows.slice()};
  var view = {row: null, cls: -1, mode: "masks", opacity: 0.6, z: 1, tx: 0, ty: 0, stages: [], viewports: []};

  function el(tag, attrs, kids) {
    var e = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "style") e.style.cssText = attrs[k];
      else e.setAttribute(k, attrs[k]);
    });
    (kids || []).forEach(function (k) { if (k) e.appendChild(k); });
    return e;
  }
  function url(path) {
    if (/^[a-z]+:/i.test(path)) return path;  /* already a file:// URI */
    return path.split("/").map(encodeURIComponent).join("/");
  }
  function diceColour(v) {
    var t = Math.max(0, Math.min(1, (v - 0.7) / 0.3));
    return "hsl(" + Math.round(120 * t) + ",70%,86%)";
  }
  function value(row, col) {
    if (col.dice && table.cls >= 0) return row.class_dice && row.class_dice[col.key] ? row.class_dice[col.key][table.cls] : null;
    var v = row.values[col.key];
    return v === undefined ? null : v;
  }
  function format(v, col) {
    if (v === null || v === undefined || v === "") return "";
    if (col.type === "dice") return v.toFixed(4);
    if (col.type === "num") return String(Math.round(v * 100) / 100);
    return String(v);
  }

  /* ---------------------------------------------------------------- table */
  var filterBox = el("input", {type: "search", id: "hs-filter", placeholder: "filter: text, or column<number (e.g. Dice<0.9, bend>10)"});
  var classBox = el("select", {id: "hs-table-class"});
  classBox.appendChild(el("option", {value: "-1", text: "mean over classes"}));
  classes.forEach(function (c, i) { classBox.appendChild(el("option", {value: String(i), text: c})); });
  var count = el("span", {id: "hs-count"});
  var thead = el("thead"), tbody = el("tbody");
  host.appendChild(el("div", {"class": "hs-tools"}, [
    filterBox, hasDice ? el("label", {text: "Dice of "}, [classBox]) : null, count]));
  host.appendChild(el("div", {"class": "hs-scroll"}, [el("table", {id: "hs-table"}, [thead, tbody])]));

  function drawHead() {
    var tr = el("tr");
    columns.forEach(function (col, i) {
      var label = col.label + (col.dice && table.cls >= 0 ? " (" + classes[table.cls] + ")" : "");
      if (table.sort === i) label += table.desc ? " \u25BC" : " \u25B2";
      var th = el("th", {text: label, title: (col.title || col.label) + " - click to sort", "data-key": col.key,
        "class": (col.type === "text" ? "text" : "num") + (table.sort === i ? " sorted" : "")});
      th.addEventListener("click", function () {
        if (table.sort === i) table.desc = !table.desc; else { table.sort = i; table.desc = false; }
        drawHead(); drawBody();
      });
      tr.appendChild(th);
    });
    thead.replaceChildren(tr);
  }

  function parseFilter(text) {
    return text.trim().toLowerCase().split(/\s+/).filter(Boolean).map(function (tok) {
      var m = /^([^<>=]+)(<=|>=|<|>|=)(-?[0-9.]+)$/.exec(tok);
      if (m) {
        var col = columns.filter(function (c) {
          return c.key.toLowerCase() === m[1] || c.label.toLowerCase() === m[1];
        })[0] || columns.filter(function (c) { return c.label.toLowerCase().indexOf(m[1]) === 0; })[0];
        if (col) return {cols: [col], op: m[2], num: parseFloat(m[3])};
        /* "dice<0.9" where no column is called Dice: any of the Dice columns (one per CSV) */
        if (m[1] === "dice" && hasDice) return {cols: columns.filter(function (c) { return c.dice; }), op: m[2], num: parseFloat(m[3])};
      }
      return {text: tok};
    });
  }
  function keep(row, tests) {
    return tests.every(function (t) {
      if (t.text !== undefined) {
        return columns.some(function (c) { return format(value(row, c), c).toLowerCase().indexOf(t.text) >= 0; });
      }
      return t.cols.some(function (col) {
        var v = value(row, col);
        if (typeof v !== "number") return false;
        return t.op === "<" ? v < t.num : t.op === ">" ? v > t.num : t.op === "<=" ? v <= t.num
          : t.op === ">=" ? v >= t.num : Math.abs(v - t.num) < 1e-9;
      });
    });
  }
  function drawBody() {
    var tests = parseFilter(table.filter);
    var shown = rows.filter(function (r) { return keep(r, tests); });
    if (table.sort !== null) {
      var col = columns[table.sort], sign = table.desc ? -1 : 1;
      shown.sort(function (a, b) {
        var x = value(a, col), y = value(b, col);
        if (x === null || x === "") return 1;
        if (y === null || y === "") return -1;
        if (typeof x === "number" && typeof y === "number") return sign * (x - y) || a.index - b.index;
        return sign * String(x).localeCompare(String(y), undefined, {numeric: true}) || a.index - b.index;
      });
    }
    table.shown = shown;
    var frag = document.createDocumentFragment();
    shown.forEach(function (row) {
      var tr = el("tr", {"data-image": row.image});
      if (view.row === row) tr.className = "current";
      columns.forEach(function (col, i) {
        var v = value(row, col), td = el("td", {"class": col.type === "text" ? "text" : "num"});
        if (i === 0) td.appendChild(el("a", {href: "#image=" + encodeURIComponent(row.image), text: format(v, col)}));
        else td.textContent = format(v, col);
        if (col.type === "dice" && typeof v === "number") td.style.background = diceColour(v);
        tr.appendChild(td);
      });
      tr.addEventListener("click", function (e) { e.preventDefault(); open(row); });
      frag.appendChild(tr);
    });
    tbody.replaceChildren(frag);
    count.textContent = shown.length + " of " + rows.length + " images";
  }
  filterBox.addEventListener("input", function () { table.filter = filterBox.value; drawBody(); });
  classBox.addEventListener("change", function () { table.cls = parseInt(classBox.value, 10); drawHead(); drawBody(); });

  /* ---------------------------------------------------------------- viewer */
  var V = el("div", {id: "hs-viewer", hidden: ""});
  var title = el("span", {id: "hs-title"}), facts = el("span", {"class": "hs-facts"});
  var prev = el("button", {id: "hs-prev", title: "previous image in the table (left arrow)", text: "\u25C0 prev"});
  var next = el("button", {id: "hs-next", title: "next image in the table (right arrow)", text: "next \u25B6"});
  var close = el("button", {id: "hs-close", title: "close (Esc)", text: "\u2715 close"});
  var clsSel = el("select", {id: "hs-class"});
  clsSel.appendChild(el("option", {value: "-1", text: "all classes"}));
  classes.forEach(function (c, i) { clsSel.appendChild(el("option", {value: String(i), text: c})); });
  var modeSel = el("select", {id: "hs-mode"});
  modeSel.appendChild(el("option", {value: "masks", text: "masks"}));
  if (hasDiff) modeSel.appendChild(el("option", {value: "diff", text: "differences from the reference"}));
  var opacity = el("input", {id: "hs-opacity", type: "range", min: "0", max: "100", value: "60"});
  var zoomOut = el("button", {id: "hs-zoom-out", text: "\u2212", title: "zoom out (-)"});
  var zoomIn = el("button", {id: "hs-zoom-in", text: "+", title: "zoom in (+)"});
  var fitBtn = el("button", {id: "hs-fit", text: "fit", title: "whole image (0)"});
  var oneBtn = el("button", {id: "hs-one", text: "1:1", title: "one image pixel per screen pixel"});
  var zoomLabel = el("span", {id: "hs-zoom"});
  var panelsBox = el("div", {id: "hs-panels"});
  var links = el("div", {"class": "hs-bar", id: "hs-links"});
  var legend = el("div", {id: "hs-legend"});
  V.appendChild(el("div", {"class": "hs-bar"}, [prev, next, title, facts, el("span", {"class": "hs-spacer"}), close]));
  V.appendChild(el("div", {"class": "hs-bar"}, [
    el("label", {text: "class "}, [clsSel]), el("label", {text: "show "}, [modeSel]),
    el("label", {text: "mask opacity "}, [opacity]), zoomOut, zoomLabel, zoomIn, fitBtn, oneBtn,
    el("span", {"class": "hs-facts", text: "wheel: zoom, drag: pan"})]));
  V.appendChild(panelsBox);
  V.appendChild(legend);
  V.appendChild(links);
  document.body.appendChild(V);

  function layerOf(row, panel) {
    if (view.mode === "diff" && panel.diff && row.diffs && row.diffs[panel.key]) return row.diffs[panel.key];
    return row.layers ? row.layers[panel.key] : null;
  }
  function panelDice(row, panel) {
    if (!row.class_dice || !row.class_dice[panel.key]) return "";
    var d = row.class_dice[panel.key];
    if (view.cls >= 0) return " \u00B7 " + classes[view.cls] + " Dice " + d[view.cls].toFixed(4);
    var s = 0; d.forEach(function (v) { s += v; });
    return " \u00B7 Dice " + (s / d.length).toFixed(4);
  }

  function drawPanels() {
    var row = view.row, h = row.size[0], w = row.size[1];
    view.stages = []; view.viewports = [];
    var frag = document.createDocumentFragment();
    D.panels.forEach(function (panel) {
      var layer = layerOf(row, panel);
      var stage = el("div", {"class": "hs-stage", style: "width:" + w + "px;height:" + h + "px"});
      if (row.xray) stage.appendChild(el("img", {"class": "hs-xray", src: url(row.xray), width: w, height: h, alt: "X-ray", draggable: "false"}));
      var over = el("div", {"class": "hs-layer", style: "width:" + w + "px;height:" + h + "px;opacity:" + view.opacity});
      var note = "";
      if (!layer) note = panel.key === "gt" ? " (no labels)" : " (none)";
      else if (view.cls < 0) {
        over.appendChild(el("img", {"class": "hs-full", src: url(layer.full), width: w, height: h, alt: panel.label, draggable: "false"}));
      } else if (layer.boxes[view.cls]) {
        var b = layer.boxes[view.cls];
        over.appendChild(el("div", {"class": "hs-sprite", "data-class": classes[view.cls], style:
          "left:" + b[0] + "px;top:" + b[1] + "px;width:" + b[2] + "px;height:" + b[3] + "px;background-image:url('" +
          url(layer.sprite) + "');background-position:" + (-b[4]) + "px " + (-b[5]) + "px"}));
      } else note = " (no " + classes[view.cls] + ")";
      stage.appendChild(over);
      var port = el("div", {"class": "hs-viewport"}, [stage]);
      frag.appendChild(el("div", {"class": "hs-panel", "data-key": panel.key}, [
        el("div", {"class": "hs-panel-title", title: panel.title || panel.label, text: panel.label + note + panelDice(row, panel)}), port]));
      view.stages.push(stage); view.viewports.push(port);
      bindPan(port);
    });
    panelsBox.replaceChildren(frag);
    layout();
  }
  /* as many columns of panels as make the image largest */
  function layout() {
    if (!view.row) return;
    var n = D.panels.length, W = panelsBox.clientWidth || 1200, H = panelsBox.clientHeight || 700;
    var h = view.row.size[0], w = view.row.size[1], best = 1, bestScale = 0;
    for (var cols = 1; cols <= n; cols++) {
      var scale = Math.min(W / cols / w, (H / Math.ceil(n / cols) - 24) / h);
      if (scale > bestScale * 1.02) { best = cols; bestScale = scale; }
    }
    panelsBox.style.gridTemplateColumns = "repeat(" + best + ", minmax(0, 1fr))";
  }

  function drawLinks() {
    var row = view.row, kids = [el("span", {text: "full resolution:"})];
    if (row.xray) kids.push(el("a", {href: url(row.xray), target: "_blank", text: "X-ray"}));
    D.panels.forEach(function (panel) {
      var layer = row.layers && row.layers[panel.key];
      if (layer) kids.push(el("a", {href: url(layer.full), target: "_blank", "class": "hs-full-link", text: panel.label}));
      var diff = row.diffs && row.diffs[panel.key];
      if (diff) kids.push(el("a", {href: url(diff.full), target: "_blank", "class": "hs-full-link", text: panel.label + " differences"}));
    });
    links.replaceChildren.apply(links, kids);
  }

  function drawLegend() {
    var kids = [];
    if (view.mode === "diff") {
      var kinds = [["agree", "agree"], ["missed", "missed (reference only)"], ["extra", "extra (CSV only)"]];
      // one class shown: a pixel of another class is not drawn, so "labelled as another class" cannot occur
      if (view.cls < 0) kinds.push(["confused", "labelled as another class"]);
      kinds.forEach(function (d) {
        kids.push(el("span", {"class": "legend-item"}, [el("span", {"class": "swatch", style: "background:" + D.diff_colours[d[0]]}), el("span", {text: d[1]})]));
      });
      kids.push(el("span", {"class": "hs-spacer"}));
    }
    var row = view.row;
    classes.forEach(function (c, i) {
      var present = D.panels.some(function (p) { var l = layerOf(row, p); return l && l.boxes[i]; });
      var item = el("span", {"class": "legend-item" + (view.cls === i ? " on" : "") + (present ? "" : " absent"),
        title: "show " + c + " only (click again for all)", "data-class": c}, [
        el("span", {"class": "swatch", style: "background:" + D.colours[i]}), el("span", {text: c})]);
      item.addEventListener("click", function () { setClass(view.cls === i ? -1 : i); });
      kids.push(item);
    });
    legend.replaceChildren.apply(legend, kids);
  }

  function applyZoom() {
    var t = "translate(" + view.tx + "px," + view.ty + "px) scale(" + view.z + ")";
    view.stages.forEach(function (s) { s.style.transform = t; s.classList.toggle("pixels", view.z >= 2); });
    zoomLabel.textContent = Math.round(view.z * 100) + "%";
  }
  function portSize() {
    var p = view.viewports[0];
    return p ? [p.clientWidth || 400, p.clientHeight || 400] : [400, 400];
  }
  var CLASS_ZOOM_MAX = 8;  // a small bone is shown with its neighbours, not blown up to 2000%
  function fitBox(x, y, w, h, zmax) {
    var s = portSize();
    view.z = Math.min(s[0] / w, s[1] / h, zmax || Infinity);
    view.tx = (s[0] - w * view.z) / 2 - x * view.z;
    view.ty = (s[1] - h * view.z) / 2 - y * view.z;
    applyZoom();
  }
  function fit() {
    var row = view.row;
    if (view.cls >= 0) {
      var x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
      D.panels.forEach(function (p) {
        var l = layerOf(row, p), b = l && l.boxes[view.cls];
        if (b) { x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]); x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]); }
      });
      if (x1 > x0) {
        // the bone with a margin of its own size, and never less than a quarter of the image: context
        var side = Math.max(Math.max(x1 - x0, y1 - y0) * 2 + 16, Math.min(row.size[0], row.size[1]) / 4);
        var cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
        fitBox(cx - side / 2, cy - side / 2, side, side, CLASS_ZOOM_MAX);
        return;
      }
    }
    fitBox(0, 0, row.size[1], row.size[0]);
  }
  function zoomAt(mx, my, factor) {
    var z = Math.max(0.02, Math.min(32, view.z * factor));
    view.tx = mx - (mx - view.tx) * z / view.z;
    view.ty = my - (my - view.ty) * z / view.z;
    view.z = z;
    applyZoom();
  }
  function zoomCentre(factor) { var s = portSize(); zoomAt(s[0] / 2, s[1] / 2, factor); }
  function bindPan(port) {
    port.addEventListener("wheel", function (e) {
      e.preventDefault();
      var r = port.getBoundingClientRect();
      zoomAt(e.clientX - r.left, e.clientY - r.top, e.deltaY < 0 ? 1.2 : 1 / 1.2);
    }, {passive: false});
    port.addEventListener("mousedown", function (e) {
      if (e.button !== 0) return;
      e.preventDefault();
      var sx = e.clientX, sy = e.clientY, tx = view.tx, ty = view.ty;
      port.classList.add("dragging");
      function move(ev) { view.tx = tx + ev.clientX - sx; view.ty = ty + ev.clientY - sy; applyZoom(); }
      function up() { port.classList.remove("dragging"); window.removeEventListener("mousemove", move); window.removeEventListener("mouseup", up); }
      window.addEventListener("mousemove", move);
      window.addEventListener("mouseup", up);
    });
  }

  function setHash() {
    if (!view.row) return;
    var h = "#image=" + encodeURIComponent(view.row.image);
    if (view.cls >= 0) h += "&class=" + encodeURIComponent(classes[view.cls]);
    if (view.mode === "diff") h += "&view=diff";
    if (location.hash !== h) history.replaceState(null, "", h);
  }
  function redraw(refit) {
    var row = view.row;
    title.textContent = row.image;
    facts.textContent = columns.slice(1).filter(function (c) { return !c.dice && c.type !== "dice"; })
      .map(function (c) { var v = format(row.values[c.key], c); return v ? c.label + ": " + v : ""; })
      .filter(Boolean).join("  \u00B7  ");
    clsSel.value = String(view.cls);
    modeSel.value = view.mode;
    drawPanels(); drawLinks(); drawLegend();
    if (refit) fit(); else applyZoom();
    setHash();
  }
  function open(row) {
    var first = V.hidden;
    view.row = row;
    V.hidden = false;
    redraw(true);
    if (first) requestAnimationFrame(function () { fit(); });
    Array.prototype.forEach.call(tbody.children, function (tr) {
      tr.className = tr.getAttribute("data-image") === row.image ? "current" : "";
    });
  }
  function shut() {
    V.hidden = true;
    view.row = null;
    if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  }
  function step(delta) {
    var list = table.shown.indexOf(view.row) >= 0 ? table.shown : rows;
    var i = list.indexOf(view.row);
    if (list.length) open(list[(i + delta + list.length) % list.length]);
  }
  function setClass(i) { view.cls = i; redraw(true); }

  prev.addEventListener("click", function () { step(-1); });
  next.addEventListener("click", function () { step(1); });
  close.addEventListener("click", shut);
  clsSel.addEventListener("change", function () { setClass(parseInt(clsSel.value, 10)); });
  modeSel.addEventListener("change", function () { view.mode = modeSel.value; redraw(false); });
  opacity.addEventListener("input", function () {
    view.opacity = opacity.value / 100;
    Array.prototype.forEach.call(V.querySelectorAll(".hs-layer"), function (l) { l.style.opacity = view.opacity; });
  });
  zoomIn.addEventListener("click", function () { zoomCentre(1.5); });
  zoomOut.addEventListener("click", function () { zoomCentre(1 / 1.5); });
  fitBtn.addEventListener("click", fit);
  oneBtn.addEventListener("click", function () {
    var s = portSize(), cx = (s[0] / 2 - view.tx) / view.z, cy = (s[1] / 2 - view.ty) / view.z;
    view.z = 1; view.tx = s[0] / 2 - cx; view.ty = s[1] / 2 - cy; applyZoom();
  });
  document.addEventListener("keydown", function (e) {
    if (V.hidden || e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
    if (e.key === "Escape") shut();
    else if (e.key === "ArrowLeft") step(-1);
    else if (e.key === "ArrowRight") step(1);
    else if (e.key === "+" || e.key === "=") zoomCentre(1.5);
    else if (e.key === "-") zoomCentre(1 / 1.5);
    else if (e.key === "0") fit();
  });
  window.addEventListener("resize", function () { if (view.row) { layout(); fit(); } });

  function fromHash() {
    var params = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var i = kv.indexOf("=");
      if (i > 0) params[kv.slice(0, i)] = decodeURIComponent(kv.slice(i + 1));
    });
    var row = params.image !== undefined ? byName[params.image] : null;
    if (!row) { if (view.row) shut(); return; }
    view.cls = params["class"] !== undefined ? classes.indexOf(params["class"]) : -1;
    view.mode = params.view === "diff" && hasDiff ? "diff" : "masks";
    open(row);
  }
  window.addEventListener("hashchange", fromHash);

  drawHead();
  drawBody();
  fromHash();
})();
