// A small Markdown subset for assistant text: fenced code blocks, headings, lists, quotes,
// paragraphs, inline code, bold, italics and http(s) links. It builds virtual DOM nodes, never
// HTML strings, so nothing a model writes can become markup or script.

import { html } from './vendor/preact-htm.js';

const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\n]+\*|_[^_\n]+_)|(\[[^\]\n]+\]\((https?:\/\/[^\s)]+)\))/g;

function inline(text) {
  const out = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) out.push(text.slice(last, m.index));
    const [whole] = m;
    if (m[1]) out.push(html`<code>${whole.slice(1, -1)}</code>`);
    else if (m[2]) out.push(html`<strong>${whole.slice(2, -2)}</strong>`);
    else if (m[3]) out.push(html`<em>${whole.slice(1, -1)}</em>`);
    else if (m[4]) {
      const label = whole.slice(1, whole.indexOf(']('));
      out.push(html`<a href=${m[5]} target="_blank" rel="noopener noreferrer">${label}</a>`);
    }
    last = m.index + whole.length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

/** Markdown `text` as virtual DOM nodes. */
export function markdown(text) {
  const lines = text.split('\n');
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*(```+|~~~+)\s*([\w+-]*)/);
    if (fence) {
      const close = fence[1];
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(close)) body.push(lines[i++]);
      i++;
      out.push(html`<pre class="code" data-lang=${fence[2] || null}><code>${body.join('\n')}</code></pre>`);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      out.push(html`<p class=${`h h${heading[1].length}`}>${inline(heading[2])}</p>`);
      i++;
      continue;
    }
    if (/^\s*([-*+]|\d+[.)])\s+/.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const items = [];
      while (i < lines.length && /^\s*([-*+]|\d+[.)])\s+/.test(lines[i])) {
        items.push(html`<li>${inline(lines[i].replace(/^\s*([-*+]|\d+[.)])\s+/, ''))}</li>`);
        i++;
      }
      out.push(ordered ? html`<ol>${items}</ol>` : html`<ul>${items}</ul>`);
      continue;
    }
    if (/^>\s?/.test(line)) {
      const quote = [];
      while (i < lines.length && /^>\s?/.test(lines[i])) quote.push(lines[i++].replace(/^>\s?/, ''));
      out.push(html`<blockquote>${inline(quote.join('\n'))}</blockquote>`);
      continue;
    }
    if (!line.trim()) {
      i++;
      continue;
    }
    const para = [];
    while (
      i < lines.length &&
      lines[i].trim() &&
      !/^\s*(```|~~~|#{1,6}\s|>|[-*+]\s|\d+[.)]\s)/.test(lines[i])
    )
      para.push(lines[i++]);
    // Whatever no rule above took is a paragraph line of its own.
    if (!para.length) para.push(lines[i++]);
    out.push(html`<p>${inline(para.join('\n'))}</p>`);
  }
  return out;
}
