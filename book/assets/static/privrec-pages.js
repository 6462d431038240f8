// PrivRec Book: small fixes of the themes' behaviour, loaded on every page (_config.yml).
//
// 1. Make the visible ☰ and "Contents" buttons work at every width.
//
// sphinx-book-theme 1.3 puts its own ☰ (.primary-toggle) and contents (.secondary-toggle) buttons in
// the article header and hides pydata-sphinx-theme's copies in the top navbar, but both themes'
// scripts bind only the FIRST element of each class (document.querySelector), i.e. the hidden
// copies. The visible buttons therefore did nothing: no chapter list on a phone, no way to hide the
// sidebar on a desktop. This script forwards a click on any other copy to the bound one, so each
// button does exactly what the themes intend: >= 992 px ☰ hides/shows the sidebar (book theme),
// below it ☰ and "Contents" open the sidebars as dialogs (pydata theme).
(function () {
  function forward(selector) {
    const copies = Array.from(document.querySelectorAll(selector));
    const bound = copies[0];
    for (const copy of copies.slice(1)) {
      copy.addEventListener("click", function (event) {
        event.preventDefault();
        event.stopPropagation();
        bound.click();
      });
    }
  }

  // 2. Search snippets without TeX source. Sphinx's search page builds each result's summary from
  // the text of the page, where math is still its TeX source (\(\varepsilon\)) because MathJax
  // has not run there. Before the text is taken, each math element is replaced by a plain-text
  // reading of its TeX (Greek letters and relations as Unicode, \frac{a}{b} as a/b).
  const SYMBOLS = {
    varepsilon: "ε", epsilon: "ε", delta: "δ", Delta: "Δ", sigma: "σ", Sigma: "Σ", mu: "μ",
    tau: "τ", lambda: "λ", alpha: "α", beta: "β", gamma: "γ", theta: "θ", pi: "π", rho: "ρ",
    eta: "η", phi: "φ", omega: "ω", ell: "ℓ", infty: "∞", le: "≤", leq: "≤", ge: "≥", geq: "≥",
    ne: "≠", neq: "≠", approx: "≈", cdot: "·", times: "×", in: "∈", sum: "Σ", prod: "∏",
    sqrt: "√", to: "→", rightarrow: "→", leftarrow: "←", mid: "|", lvert: "|", rvert: "|",
    lVert: "‖", rVert: "‖", Vert: "‖", langle: "⟨", rangle: "⟩", pm: "±", propto: "∝",
    ldots: "…", dots: "…", cdots: "⋯", top: "ᵀ", log: "log", ln: "ln", exp: "exp", Pr: "Pr",
    min: "min", max: "max", quad: " ", qquad: " ",
  };
  function texToText(tex) {
    let s = tex.trim().replace(/^\\[(\[]|\\[)\]]$/g, "").replace(/^\$+|\$+$/g, "");
    for (let k = 0; k < 4; k++) {
      s = s.replace(/\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}/g, "($1)/($2)");
    }
    s = s.replace(/\\(?:mathcal|mathbb|mathrm|mathbf|operatorname|text|textrm|boldsymbol|hat|tilde|bar|left|right|big|Big|bigl|bigr|Bigl|Bigr)\b/g, "");
    s = s.replace(/\\([A-Za-z]+)/g, (m, name) => (name in SYMBOLS ? SYMBOLS[name] : name));
    s = s.replace(/\\[,;:! ]/g, " ").replace(/[{}]/g, "").replace(/\s+/g, " ");
    return s.trim();
  }
  function plainMathSearch() {
    if (typeof Search === "undefined" || Search.privrecPlainMath) return;
    const htmlToText = Search.htmlToText;
    Search.htmlToText = function (htmlString, anchor) {
      const doc = new DOMParser().parseFromString(htmlString, "text/html");
      doc.querySelectorAll(".math").forEach((el) => { el.textContent = texToText(el.textContent); });
      return htmlToText(doc.documentElement.outerHTML, anchor);
    };
    Search.privrecPlainMath = true;
  }

  // 3. Library source shown in outputs (privrec.course.book.show_source) wraps inside the column
  // (privrec-pages.css); a wrapped line continued at the column's left edge and read as code
  // without indentation. Each source line becomes a block with a hanging indent: its own
  // indentation plus four columns. Pygments' spans are flat (text only), so each is split at its
  // newlines into one copy per line.
  function hangingIndent() {
    const selector = "div.cell_output .output.text_html .highlight pre";
    for (const pre of document.querySelectorAll(selector)) {
      if (pre.querySelector(".privrec-line")) continue;
      const lines = [[]];
      for (const node of Array.from(pre.childNodes)) {
        node.textContent.split("\n").forEach((piece, k) => {
          if (k > 0) lines.push([]);
          if (!piece) return;
          const copy = node.nodeType === Node.ELEMENT_NODE ? node.cloneNode(false) : null;
          if (copy) copy.textContent = piece;
          lines[lines.length - 1].push(copy || document.createTextNode(piece));
        });
      }
      if (lines.length > 1 && lines[lines.length - 1].length === 0) lines.pop();
      pre.replaceChildren(...lines.map((nodes) => {
        const line = document.createElement("span");
        const text = nodes.map((n) => n.textContent).join("");
        const hang = text.length - text.trimStart().length + 4;
        line.className = "privrec-line";
        line.style.paddingLeft = `${hang}ch`;
        line.style.textIndent = `-${hang}ch`;
        line.append(...(nodes.length ? nodes : [document.createTextNode(" ")]));
        return line;
      }));
    }
  }

  function setup() {
    forward(".primary-toggle");
    forward(".secondary-toggle");
    plainMathSearch();
    hangingIndent();
  }
  window.privrecTexToText = texToText;
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", setup);
  } else {
    setup();
  }
  plainMathSearch();  // as early as possible if searchtools.js is already loaded
})();
