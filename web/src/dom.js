// Building the page: elements made with the DOM, text always as text (nothing a server
// sends is ever parsed as HTML).

/** An element: h('td', {class: 'num'}, 'text', child, [more children]). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replace what ``el`` shows. */
export function show(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

/** A table from a header row and rows of cells (a cell: text, a node, or [attrs, ...]). */
export function table(head, rows) {
  const body = h('tbody');
  for (const row of rows) body.append(tableRow(row));
  return h('div', { class: 'scroll' }, h('table', {}, h('thead', {}, h('tr', {}, head.map((t) => h('th', {}, t)))), body));
}

export function tableRow(cells) {
  return h('tr', {}, cells.map((c) => (Array.isArray(c) ? h('td', c[0], ...c.slice(1)) : h('td', {}, c))));
}

/** A definition list from [term, value] pairs. */
export function facts(pairs) {
  return h('dl', {}, pairs.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

/** A bar chart (inline SVG) of values, oldest first. */
export function bars(values, label) {
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  const n = Math.max(values.length, 1);
  const top = Math.max(1, ...values);
  svg.setAttribute('viewBox', `0 0 ${n * 10} 100`);
  svg.setAttribute('preserveAspectRatio', 'none');
  svg.setAttribute('class', 'chart');
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', label);
  values.forEach((v, i) => {
    const r = document.createElementNS(ns, 'rect');
    const height = (v / top) * 100;
    r.setAttribute('x', String(i * 10 + 1));
    r.setAttribute('y', String(100 - height));
    r.setAttribute('width', '8');
    r.setAttribute('height', String(height));
    svg.append(r);
  });
  return svg;
}

/** Sats and millisats, as people read them. */
export function msat(v) {
  const n = BigInt(v);
  const sats = n / 1000n;
  const rest = n % 1000n;
  return `${sats.toLocaleString('en-US')}${rest ? '.' + rest.toString().padStart(3, '0') : ''} sat`;
}

export function short(hex) {
  return hex.length > 20 ? `${hex.slice(0, 10)}…${hex.slice(-8)}` : hex;
}
