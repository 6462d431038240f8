// What a reader sees on one built page (tests/test_built_book.py evaluates this in the page, after
// MathJax has run, at a 1280 px window). Returns a plain object; the test asserts on its parts.
// Argument: the regular expression (source) of visible TeX.
(texPattern) => {
  const TEX = new RegExp(texPattern);
  const main = document.querySelector("article.bd-article") || document.querySelector("main");
  const style = getComputedStyle(main);
  const column = Math.round(main.clientWidth - parseFloat(style.paddingLeft)
                            - parseFloat(style.paddingRight));
  // checkVisibility: false inside a closed <details> too (content-visibility), unlike client rects
  const visible = (el) => !!el && el.getClientRects().length > 0
    && el.checkVisibility({visibilityProperty: true, contentVisibilityAuto: true});
  const snippet = (text) => text.replace(/\s+/g, " ").trim().slice(0, 100);
  const report = {column, tex: [], wide: [], images: [], solutions: [], explores: [], widgets: 0};

  // 1. TeX source in the text: every text node outside code, code-like outputs and rendered math.
  const CODE = "pre, code, kbd, samp, script, style, textarea, mjx-container, .highlight";
  const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const node = walker.currentNode;
    if (!node.parentElement || node.parentElement.closest(CODE)) continue;
    const match = TEX.exec(node.textContent);
    if (match) {
      const text = node.textContent;
      const at = Math.max(0, match.index - 40);
      report.tex.push(snippet(text.slice(at, match.index + 60)));
    }
  }

  // 2. Solutions visible without a click: text inside an admonition titled "Solution"/"Answer",
  //    a section headed "Solution(s)", or an element whose class names a solution, other than
  //    titles, headings and the buttons that open them.
  const SOLUTION = /^\s*(solutions?|answers?)\b/i;
  const OPENERS = ".admonition-title, summary, button, .toggle-button, h1, h2, h3, h4, h5, h6, " +
                  ".headerlink";
  const containers = new Set();
  for (const adm of main.querySelectorAll(".admonition")) {
    const title = adm.querySelector(":scope > .admonition-title");
    if (title && SOLUTION.test(title.textContent)) containers.add(adm);
  }
  for (const sec of main.querySelectorAll("section")) {
    const heading = sec.querySelector(":scope > h1, :scope > h2, :scope > h3, :scope > h4");
    if (heading && SOLUTION.test(heading.textContent)) containers.add(sec);
  }
  for (const el of main.querySelectorAll('[class*="solution" i]')) containers.add(el);
  for (const box of containers) {
    // A Solutions section may open with a paragraph (an introduction) before its first answer.
    const first = box.tagName === "SECTION" ? box.querySelector(":scope > .admonition, :scope > .cell")
      : null;
    const intro = (el) => {
      const p = el.closest("p");
      return !!(first && p && p.parentElement === box
                && (p.compareDocumentPosition(first) & Node.DOCUMENT_POSITION_FOLLOWING));
    };
    const texts = document.createTreeWalker(box, NodeFilter.SHOW_TEXT);
    while (texts.nextNode()) {
      const node = texts.currentNode;
      const parent = node.parentElement;
      if (!node.textContent.trim() || !parent || parent.closest(OPENERS) || intro(parent)) continue;
      if (parent.closest("script, style")) continue;
      if (visible(parent)) {
        report.solutions.push(snippet(node.textContent));
        break;
      }
    }
  }

  // 3. Explore sections: visible figures (images, and charts drawn as SVG) and static faces.
  const EXPLORE = /^\s*(explore|the explorer|动手探索|页面中的探索器)/i;
  for (const sec of main.querySelectorAll("section")) {
    const heading = sec.querySelector(":scope > h2, :scope > h3");
    if (!heading || !EXPLORE.test(heading.textContent)) continue;
    if (sec.parentElement.closest("section.privrec-explore")) continue;  // counted with its parent
    sec.classList.add("privrec-explore");
    const figures = Array.from(sec.querySelectorAll("img, svg[role='img'], canvas"))
      .filter((el) => visible(el) && el.getBoundingClientRect().width >= 150);
    report.explores.push({
      title: snippet(heading.textContent.replace("#", "")), figures: figures.length,
      roots: sec.querySelectorAll(".privrec-static-widget, .privrec-explorer").length,
    });
  }

  // 4. ipywidget views (inert without a kernel).
  report.widgets = main.querySelectorAll(
    'script[type="application/vnd.jupyter.widget-view+json"], .jupyter-widgets.widget-inline-hbox, ' +
    ".jupyter-widgets.widget-interact").length;

  // Open everything a reader can open (hidden cells, dropdowns) before measuring widths and images.
  main.querySelectorAll("details").forEach((d) => { d.open = true; });
  main.querySelectorAll(".toggle-hidden").forEach((el) => el.classList.remove("toggle-hidden"));

  // 5. Outputs, tables and code blocks of the prose wider than the column (their own width or
  //    what they scroll); a notebook's code cells are left out.
  const seen = new Set();
  const boxes = [...main.querySelectorAll(".cell_output, table"),
                 ...Array.from(main.querySelectorAll("pre")).filter((p) => !p.closest(".cell"))];
  for (const box of boxes) {
    for (const el of [box, ...box.querySelectorAll("*")]) {
      if (seen.has(el) || !visible(el)) continue;
      seen.add(el);
      const width = Math.max(el.scrollWidth, el.getBoundingClientRect().width);
      if (width > column + 1) {
        const what = el.tagName.toLowerCase() + (el.className && typeof el.className === "string"
          ? "." + el.className.split(" ")[0] : "") + ": " + snippet(el.textContent || el.outerHTML);
        report.wide.push({width: Math.round(width), what});
        box.querySelectorAll("*").forEach((d) => seen.add(d));  // one report per output
        break;
      }
    }
  }

  // 6. Images and charts: alt text, natural and shown width.
  for (const img of main.querySelectorAll("img")) {
    if (!visible(img)) continue;
    const figure = !!img.closest(".cell_output, .privrec-static-widget");
    report.images.push({
      kind: figure ? "figure" : "image", figure, alt: img.getAttribute("alt") || "",
      src: (img.getAttribute("src") || "").slice(0, 60), natural: img.naturalWidth,
      shown: Math.round(img.getBoundingClientRect().width),
    });
  }
  for (const svg of main.querySelectorAll("svg[role='img']")) {
    if (!visible(svg) || svg.getBoundingClientRect().width < 150) continue;  // icons are not charts
    report.images.push({kind: "chart", figure: false, alt: svg.getAttribute("aria-label") || "",
                        src: "svg", natural: 0, shown: Math.round(svg.getBoundingClientRect().width)});
  }
  return report;
}
