// The operator console: one operator's processes and the figures its dashboards show,
// refreshed every few seconds. The token stays in this tab (sessionStorage) and goes
// with each request; the gateway checks it and logs the request.

import { facts, h, show, table } from './dom.js';

const TOKEN_KEY = 'constellation.console';
const REFRESH_MS = 5000;
const main = document.getElementById('main');
let timer = null;

/** What a process's /readyz says (JSON with a reason, or text). */
function reason(text) {
  try {
    return JSON.parse(text).reason ?? text;
  } catch {
    return text || '';
  }
}

function labels(l) {
  return Object.entries(l).map(([k, v]) => `${k}=${v}`).join(' ');
}

/** A figure's name without its service's prefix (replica_lag_blocks: lag blocks). */
function short(name) {
  return name.split('_').slice(1).join(' ');
}

function number(v) {
  if (!Number.isFinite(v)) return String(v);
  return Number.isInteger(v) ? v.toLocaleString('en-US') : v.toFixed(3);
}

async function load() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return;
  const r = await fetch('/v1/console', { headers: { Authorization: `Bearer ${token}` } });
  const doc = await r.json().catch(() => ({}));
  if (!r.ok) {
    clearInterval(timer);
    sessionStorage.removeItem(TOKEN_KEY);
    show(main, h('p', { class: 'bad', id: 'refused' }, `refused: ${doc.error ? doc.error.message : r.status}`));
    return;
  }
  render(doc);
}

function render(doc) {
  const processes = doc.processes;
  const up = processes.filter((p) => p.ready).length;
  const parts = [
    h('h1', {}, `Operator ${doc.operator}`),
    facts([
      ['processes ready', h('span', { id: 'ready-count', class: up === processes.length ? 'ok' : 'bad' }, `${up} of ${processes.length}`)],
      ['refreshed', new Date().toISOString().replace('T', ' ').slice(0, 19) + ' UTC'],
      ...(doc.grafana ? [['dashboards', h('a', { href: doc.grafana, rel: 'noreferrer' }, 'Grafana')]] : []),
    ]),
    h('h2', {}, 'Processes'),
    table(['process', 'up', 'ready', 'says'], processes.map((p) => [
      p.name,
      [{ class: p.up ? 'ok' : 'bad' }, p.up ? 'up' : 'down'],
      [{ class: p.ready ? 'ok' : 'bad' }, p.ready ? 'ready' : 'not ready'],
      p.error || reason(p.readiness),
    ])),
  ];
  for (const panel of doc.panels) {
    // a row per process and label set (a copy of a shard, a peer, a channel…), a column
    // per figure
    const names = [];
    const rows = new Map();
    for (const p of processes) {
      for (const s of (p.metrics || {})[panel] || []) {
        if (!names.includes(s.name)) names.push(s.name);
        const key = `${p.name} ${labels(s.labels)}`;
        if (!rows.has(key)) rows.set(key, { process: p.name, labels: labels(s.labels), values: {} });
        rows.get(key).values[s.name] = s.value;
      }
    }
    if (!rows.size) continue;
    const head = ['process', 'of', ...names.map(short)];
    const body = [...rows.values()].map((r) => [r.process, [{ class: 'mono' }, r.labels], ...names.map((n) => [{ class: 'num' }, n in r.values ? number(r.values[n]) : ''])]);
    parts.push(h('section', { 'data-panel': panel }, h('h2', {}, panel), table(head, body)));
  }
  show(main, parts);
}

document.getElementById('login').addEventListener('submit', (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById('token').value);
  clearInterval(timer);
  load();
  timer = setInterval(load, REFRESH_MS);
});
if (sessionStorage.getItem(TOKEN_KEY)) {
  load();
  timer = setInterval(load, REFRESH_MS);
}
