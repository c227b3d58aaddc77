// MathJax 3 configuration for the book (loaded in <head>, before MathJax itself).
//
// Two kinds of pages hold math:
// * Markdown pages: pymdownx.arithmatex (generic mode) wraps each formula in an element of class
//   "arithmatex" with \( \) or \[ \] delimiters.
// * Chapter pages (notebooks rendered by mkdocs-jupyter): markdown cells keep the notebook's own
//   $...$ and $$...$$ delimiters inside elements of class "jp-RenderedMarkdown" (markdown cells and
//   Markdown outputs) or "jp-RenderedLatex" (text/latex outputs, e.g. IPython.display.Math).
// Everything else in the article (class "md-typeset") is left alone, so a dollar sign in prose or in
// a code output is never mistaken for math; so is an element of class "tex2jax_ignore", which
// `scripts/book.py prepare` puts around each escaped \$ of a notebook's markdown.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
    tags: "ams",
  },
  options: {
    ignoreHtmlClass: "md-typeset|tex2jax_ignore",
    processHtmlClass: "arithmatex|jp-RenderedMarkdown|jp-RenderedLatex",
  },
};
