// PrivRec Book (not vendored): loaded between require.js and embed-amd.js (_config.yml,
// nb_ipywidgets_js) so that pages with widgets load without errors and without the network.
(function () {
  "use strict";

  // 1. Fonts. Each AMD module in embed-amd.js ("@jupyter-widgets/base", ".../controls",
  // ".../base7", ".../controls7", ".../html-manager", ".../html-manager/dist/libembed-amd") finds
  // its font files (the *.woff2/woff/ttf/eot/svg beside this file) in the folder of the URI that
  // require.js gives the module, and injects its CSS before it reads
  // __jupyter_widgets_assets_path__. Unmapped, that folder is "@jupyter-widgets/" next to the
  // page, which does not exist; which module's @font-face the browser used depended on load
  // order, so a page requested missing fonts only sometimes. Map every module to this folder
  // (require.js takes the longest matching prefix, so both entries are needed).
  var src = document.currentScript.src.split("?")[0];
  var folder = src.slice(0, src.lastIndexOf("/"));
  window.__jupyter_widgets_assets_path__ = folder + "/";
  require.config({
    paths: { "@jupyter-widgets": folder, "@jupyter-widgets/html-manager/dist": folder },
  });

  // 2. Math in widget labels. @jupyter-widgets/controls typesets a description with the MathJax 2
  // call `MathJax.Hub.Queue(["Typeset", MathJax.Hub, element])` whenever window.MathJax exists;
  // the book loads MathJax 3, which has no Hub, so every widget threw "Cannot read properties of
  // undefined (reading 'Queue')". Give each object assigned to window.MathJax (the configuration
  // first, then MathJax 3 itself) a non-enumerable Hub whose Queue typesets with MathJax 3.
  function queue(job) {
    var mathjax = window.MathJax;
    var element = job && job[2];
    if (!element || !mathjax || typeof mathjax.typesetPromise !== "function") {
      return; // MathJax 3 not started yet: its start-up typesets the whole page anyway.
    }
    var ready = (mathjax.startup && mathjax.startup.promise) || Promise.resolve();
    ready.then(function () { return mathjax.typesetPromise([element]); });
  }
  function withHub(value) {
    if (value && typeof value === "object" && !Object.prototype.hasOwnProperty.call(value, "Hub")) {
      Object.defineProperty(value, "Hub", { value: { Queue: queue }, enumerable: false, configurable: true });
    }
    return value;
  }
  var current = withHub(window.MathJax);
  Object.defineProperty(window, "MathJax", {
    configurable: true,
    enumerable: true,
    get: function () { return current; },
    set: function (value) { current = withHub(value); },
  });
})();
