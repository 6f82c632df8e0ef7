// The guild explorer: one page, its views chosen by the address's #fragment. What it
// shows as verified it checked here (verify.js), against the guild descriptor this
// browser pinned the first time it came (or the one its user pasted), never on the
// server's word.

import { bars, facts, h, msat, short, show, table, tableRow } from './dom.js';
import {
  Descriptor,
  ProofRefused,
  bytesToHex,
  checkpointMessage,
  decodeAnnounced,
  decodeCoinProof,
  decodeSignedCheckpoint,
  decodeTxProof,
  encodeAddress,
  hexToBytes,
  membersRoot,
  shardOf,
  verifyAnnounced,
  verifyCoin,
  verifyTx,
} from './verify.js';

const PIN_KEY = 'constellation.descriptor';
const LIVE_MS = 2000; // the guild page's refresh
const HISTORY_PAGE = 500;
const HISTORY_MOST = 5000;
const HEX64 = /^[0-9a-fA-F]{64}$/;

const main = document.getElementById('main');
let view = 0; // bumped on every navigation: a late answer for an old view is dropped
let timer = null;
let socket = null;
let trusted = null; // {pin, descriptor, served, handovers, error}
let guild = null; // /v1/shards, once: the network's prefix and the members

class ApiFailed extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path) {
  const r = await fetch(path, { headers: { Accept: 'application/json' } });
  const doc = await r.json().catch(() => ({}));
  if (!r.ok) {
    const e = doc.error || {};
    throw new ApiFailed(r.status, e.code || String(r.status), e.message || r.statusText);
  }
  return doc;
}

// -- what this browser trusts ---------------------------------------------------------

/** The pin (the descriptor pinned here, and the handovers followed from it). */
async function trust() {
  if (trusted) return trusted;
  const served = await api('/v1/lc/descriptor');
  let text = localStorage.getItem(PIN_KEY);
  const first = !text;
  if (first) {
    text = served.descriptor;
    localStorage.setItem(PIN_KEY, text);
  }
  const descriptor = Descriptor.decode(text);
  let pin = descriptor.pin;
  let error = null;
  const { handovers } = await api('/v1/lc/handovers?start=0');
  for (const ho of handovers) {
    try {
      pin = pin.follow(decodeSignedCheckpoint(hexToBytes(ho.encoded)));
    } catch (e) {
      error = refusal(e);
      break;
    }
  }
  // The chain followed starts at the descriptor's first checkpoint: a gateway serving
  // another guild's history under this key is caught here.
  const { checkpoints: [genesis] } = await api('/v1/lc/checkpoints?start=0&count=1');
  if (!error && genesis) {
    try {
      const c = verifyAnnounced(pin, decodeAnnounced(hexToBytes(genesis.encoded))).checkpoint;
      if (bytesToHex(checkpointMessage(c)) !== bytesToHex(descriptor.first)) {
        error = "checkpoint 0 is not the descriptor's first checkpoint";
      }
    } catch (e) {
      error = refusal(e);
    }
  }
  trusted = { pin, descriptor: text, served, first, handovers: pin.handovers.length, error };
  return trusted;
}

async function shards() {
  guild = await api('/v1/shards');
  return guild;
}

function refusal(e) {
  if (e instanceof ProofRefused) return `${e.code}: ${e.message}`;
  return `${e.name}: ${e.message}`;
}

function verdict(ok, text) {
  return h('div', { class: `verdict ${ok ? 'ok' : 'bad'}`, 'data-verified': ok ? 'yes' : 'no' },
    h('span', { class: ok ? 'ok' : 'bad' }, ok ? '✓ verified' : '✗ does not verify'), ' ', text);
}

function address(ownerHex) {
  try {
    return encodeAddress(hexToBytes(ownerHex), guild ? guild.network : 'rcst');
  } catch {
    return ownerHex;
  }
}

const link = {
  tx: (id) => h('a', { href: `#/tx/${id}`, class: 'mono' }, short(id)),
  coin: (id, ledger) => h('a', { href: `#/coin/${id}${ledger ? `?ledger=${encodeURIComponent(ledger)}` : ''}`, class: 'mono' }, short(id)),
  address: (a) => h('a', { href: `#/address/${a}`, class: 'mono' }, a),
  block: (worker, height) => h('a', { href: `#/blocks/${worker}?before=${height + 1}` }, `${worker}/${height}`),
};

// -- the views --------------------------------------------------------------------------

async function guildView(me) {
  const t = await trust();
  const d = t.served;
  const pinned = Descriptor.decode(t.descriptor);
  const servedKeys = d.member_keys.map((m) => [m.name, hexToBytes(m.key)]);
  const membersOk = bytesToHex(membersRoot(d.threshold, servedKeys)) === bytesToHex(pinned.pin.members);
  const parts = [
    h('h1', {}, `Guild ${pinned.pin.guild}`),
    t.descriptor !== d.descriptor
      ? verdict(false, 'this gateway serves another descriptor than the one this browser pinned')
      : null,
    t.error ? verdict(false, `the guild's history does not follow from the pinned descriptor: ${t.error}`) : null,
    facts([
      ['descriptor', h('span', { class: 'mono', id: 'descriptor' }, t.descriptor)],
      ['pinned', t.first ? 'now, on this first visit (paste a descriptor you trust below)' : 'earlier, in this browser'],
      ['guild key', h('span', { class: 'mono', id: 'guild-key' }, bytesToHex(t.pin.at(2n ** 62n)[0]))],
      ['key handovers followed', String(t.handovers)],
      ['threshold', `${d.threshold} of ${d.member_keys.length}`],
    ]),
    h('h2', {}, 'Members'),
    membersOk
      ? verdict(true, 'the member set below is the one the pinned descriptor commits to')
      : verdict(false, 'the member set below is not the one the pinned descriptor commits to'),
    table(['name', 'operator key'], d.member_keys.map((m) => [m.name, [{ class: 'mono' }, m.key]])),
    h('h2', {}, 'Shards'),
    h('div', { id: 'shards' }, h('p', { class: 'muted' }, 'asking the leaders…')),
    h('h2', {}, 'Payments a second (this ledger, last minute)'),
    h('div', { id: 'rate' }),
    h('h2', {}, 'Latest checkpoints'),
    h('div', { id: 'checkpoints' }, h('p', { class: 'muted' }, 'loading…')),
    h('h2', {}, 'Pin another descriptor'),
    h('form', { id: 'pin-form', onsubmit: pinAnother },
      h('input', { id: 'pin-text', class: 'mono', placeholder: 'cstguild1…', 'aria-label': 'descriptor' }), ' ',
      h('button', {}, 'Pin')),
  ];
  if (me !== view) return;
  show(main, parts);
  const seen = new Map(); // shard -> [height, time]: the block rate between refreshes
  const refresh = async () => {
    const [s, rate, cps] = await Promise.all([shards(), api('/v1/rate?seconds=60'), checkpointsView(t.pin)]);
    if (me !== view) return;
    const now = performance.now();
    show(document.getElementById('shards'), table(
      ['ledger', 'shard', 'leader', 'term', 'confirmed height', 'blocks/s', 'coins'],
      s.shards.map((x) => {
        const key = `${x.ledger}/${x.worker}`;
        const before = seen.get(key);
        let perS = '';
        if (before && x.confirmed !== undefined) perS = ((x.confirmed - before[0]) / ((now - before[1]) / 1000)).toFixed(1);
        if (x.confirmed !== undefined) seen.set(key, [x.confirmed, now]);
        const leader = x.leader ? `${x.leader.member} (copy ${x.leader.copy})` : x.error || 'this worker';
        const shard = x.ledger === s.ledger ? h('a', { href: `#/blocks/${x.worker}` }, String(x.worker)) : String(x.worker);
        return [x.ledger, shard, leader, x.leader ? String(x.leader.term) : '', [{ class: 'num' }, x.confirmed ?? ''], [{ class: 'num' }, perS], [{ class: 'num' }, x.coins ?? '']];
      })));
    const end = Math.floor(Date.now() / 1000);
    const counts = new Map(rate.rate.map((r) => [r.second, r.txs]));
    const values = [];
    for (let sec = end - 59; sec <= end; sec++) values.push(counts.get(sec) || 0);
    const last = values.slice(-10).reduce((a, b) => a + b, 0) / 10;
    show(document.getElementById('rate'), bars(values, 'payments a second'), h('p', { class: 'muted' }, `${last.toFixed(1)} a second over the last 10 s`));
    show(document.getElementById('checkpoints'), cps);
  };
  await refresh();
  timer = setInterval(() => refresh().catch(() => {}), LIVE_MS);
}

function pinAnother(ev) {
  ev.preventDefault();
  const text = document.getElementById('pin-text').value.trim();
  try {
    Descriptor.decode(text);
  } catch (e) {
    alert(`not a guild descriptor: ${refusal(e)}`);
    return;
  }
  localStorage.setItem(PIN_KEY, text);
  trusted = null;
  route();
}

/** The latest checkpoints, each checked against the pin. */
async function checkpointsView(pin) {
  let latest;
  try {
    latest = await api('/v1/lc/checkpoints/latest');
  } catch (e) {
    return h('p', { class: 'muted' }, `no checkpoint yet (${e.message})`);
  }
  const start = Math.max(0, latest.height - 9);
  const { checkpoints } = await api(`/v1/lc/checkpoints?start=${start}&count=10`);
  const rows = checkpoints.reverse().map((c) => {
    let ok = true;
    let why = '';
    let entries = [];
    try {
      entries = verifyAnnounced(pin, decodeAnnounced(hexToBytes(c.encoded))).entries;
    } catch (e) {
      ok = false;
      why = refusal(e);
    }
    return [
      [{ class: 'num' }, String(c.height)],
      new Date(c.time_ms).toISOString().replace('T', ' ').slice(0, 19),
      ok ? String(entries.length) : '',
      [{ class: 'num' }, ok ? String(entries.reduce((a, e) => a + e.size, 0)) : ''],
      [{ class: ok ? 'ok' : 'bad', 'data-height': c.height }, ok ? '✓ verified' : `✗ ${why}`],
    ];
  });
  return table(['height', 'time (UTC)', 'shards', 'records', 'signature'], rows);
}

async function txView(me, txid) {
  const t = await trust();
  if (!guild) await shards();
  const [indexed, proof] = await Promise.allSettled([api(`/v1/tx/${txid}`), api(`/v1/lc/tx/${txid}`)]);
  if (me !== view) return;
  const parts = [h('h1', {}, 'Transaction ', h('span', { class: 'mono' }, txid))];
  let state = 'unknown here';
  if (indexed.status === 'fulfilled') {
    const x = indexed.value;
    state = x.status === 'pending' ? 'pending (being committed now)' : 'confirmed';
    const paidOut = (x.changes || []).filter((c) => c.kind === 'paid_out');
    const pending = paidOut.filter((c) => c.settlement !== 'settled').length;
    if (paidOut.length && pending) state += `; pending between operators (${pending} of ${paidOut.length} output(s) to other ledgers not settled yet)`;
    else if (paidOut.length) state += '; settled between operators';
    const info = [['state (this gateway says)', h('span', { id: 'tx-state' }, state)]];
    if (x.block) info.push(['committed in block', link.block(x.block.worker, x.block.height)], ['fee', msat(x.fee_msat)], ['indexed at', x.at]);
    parts.push(facts(info));
    if (x.changes) parts.push(h('h2', {}, 'Inputs and outputs (this ledger)'), changesTable(x.changes));
  } else {
    parts.push(facts([['state (this gateway says)', h('span', { id: 'tx-state' }, `not in this ledger's index (${indexed.reason.message})`)]]));
  }
  parts.push(h('h2', {}, 'Proof'));
  if (proof.status === 'rejected') {
    parts.push(h('p', { class: 'muted', id: 'proof' }, `no proof yet: ${proof.reason.message} (a transaction is provable once a checkpoint covers it)`));
  } else {
    try {
      const placed = verifyTx(t.pin, decodeTxProof(hexToBytes(proof.value.proof)), hexToBytes(txid));
      parts.push(h('div', { id: 'proof' }, verdict(true, `committed, under checkpoint ${proof.value.checkpoints.join(', ')}, signed by the guild key`)),
        h('h2', {}, 'Blocks that carry it'), placedTable(placed));
    } catch (e) {
      parts.push(h('div', { id: 'proof' }, verdict(false, refusal(e))));
    }
  }
  show(main, parts);
}

function placedTable(placed) {
  const members = guild ? guild.members : [];
  const rows = [];
  for (const p of placed) {
    const r = p.record;
    const where = `${members[p.owner] ?? `member ${p.owner}`} shard ${p.worker}, block ${r.height}`;
    const head = r.committed ? `commit, fee ${msat(r.fee_msat)}` : '';
    for (const c of r.changes) {
      rows.push([where, String(p.checkpoint), c.kind, link.coin(bytesToHex(c.coin_id), members[p.owner]), link.address(address(bytesToHex(c.owner))), [{ class: 'num' }, msat(c.value_msat)], head]);
    }
    if (!r.changes.length) rows.push([where, String(p.checkpoint), '', '', '', '', head]);
  }
  return table(['shard and block', 'checkpoint', 'change', 'coin', 'owner', 'value', ''], rows);
}

function changesTable(changes) {
  return table(['change', 'coin', 'owner', 'value', 'block'], changes.map((c) => [
    c.kind === 'paid_out' ? `paid out to ${c.ledger ?? c.ledger_id}: ${c.settlement}` : c.kind,
    c.released_as ? link.coin(c.released_as, c.ledger) : c.kind === 'paid_out' ? h('span', { class: 'mono' }, short(c.coin_id)) : link.coin(c.coin_id),
    c.address ? link.address(c.address) : '',
    [{ class: 'num' }, msat(c.value_msat)],
    c.block ? link.block(c.block.worker, c.block.height) : 'committed, not indexed yet',
  ]));
}

async function coinView(me, coinId, ledger) {
  const t = await trust();
  const s = guild || (await shards());
  const name = ledger || s.ledger;
  const q = `?ledger=${encodeURIComponent(name)}`;
  const [indexed, proof, latest] = await Promise.allSettled([
    api(`/v1/coin/${coinId}${q}`), api(`/v1/lc/coin/${coinId}${q}`), api('/v1/lc/checkpoints/latest'),
  ]);
  if (me !== view) return;
  const parts = [h('h1', {}, 'Coin ', h('span', { class: 'mono' }, coinId))];
  if (indexed.status === 'fulfilled') {
    const c = indexed.value;
    const info = [['ledger', name], ['status (this gateway says)', h('span', { id: 'coin-status' }, c.status)]];
    if (c.value_msat !== undefined) info.push(['value', msat(c.value_msat)]);
    if (c.address) info.push(['owner', link.address(c.address)]);
    if (c.spent_by) info.push(['spent by', link.tx(c.spent_by)]);
    if (c.from) info.push(['paid from', `${c.from.ledger}, transaction `, link.tx(c.from.txid)]);
    parts.push(facts(info));
  } else {
    parts.push(facts([['status (this gateway says)', h('span', { id: 'coin-status' }, indexed.reason.message)]]));
  }
  parts.push(h('h2', {}, 'Proof'));
  if (proof.status === 'rejected' || latest.status === 'rejected') {
    const why = (proof.status === 'rejected' ? proof : latest).reason.message;
    parts.push(h('p', { class: 'muted', id: 'proof' }, `no proof: ${why}`));
  } else {
    const owner = s.members.indexOf(name);
    const workers = latest.value.entries.filter((e) => e.owner === owner).length;
    try {
      const id = hexToBytes(coinId);
      const v = verifyCoin(t.pin, decodeCoinProof(hexToBytes(proof.value.proof)), id, [owner, shardOf(id, workers)]);
      const what = !v.leaf ? 'no such coin in its shard'
        : v.leaf.state === 'spent' ? `spent by ${bytesToHex(v.leaf.txid)} in block ${v.leaf.height}`
          : `unspent: ${msat(v.leaf.value_msat)} to ${address(bytesToHex(v.leaf.owner))}`;
      parts.push(h('div', { id: 'proof' }, verdict(true, `as of checkpoint ${v.checkpoint}: ${what}`)));
    } catch (e) {
      parts.push(h('div', { id: 'proof' }, verdict(false, refusal(e))));
    }
  }
  show(main, parts);
}

async function addressView(me, addr) {
  if (!guild) await shards();
  // Subscribed before reading: a payment that commits meanwhile is pushed, and kept
  // until the page is built (what the pages read already is not added twice).
  const early = [];
  let take = (msg) => early.push(msg);
  const following = follow(me, addr, (msg) => take(msg));
  const coins = [];
  for (let after = ''; ;) {
    const page = await api(`/v1/address/${addr}/coins?limit=${HISTORY_PAGE}${after}`);
    coins.push(...page.coins);
    if (page.next === undefined || coins.length >= HISTORY_MOST) break;
    after = `&after=${page.next}`;
  }
  const history = [];
  for (let before = ''; ;) {
    const page = await api(`/v1/address/${addr}/history?limit=${HISTORY_PAGE}${before}`);
    history.push(...page.history);
    if (page.history.length < HISTORY_PAGE || history.length >= HISTORY_MOST) break;
    before = `&before=${page.history[page.history.length - 1].seq}`;
  }
  if (me !== view) return;
  const coinRows = h('tbody');
  const held = new Map(); // coin id -> [coin, its row]
  for (const c of coins) {
    const row = coinRow(c);
    held.set(c.coin_id, [c, row]);
    coinRows.append(row);
  }
  const historyRows = h('tbody', { id: 'history' });
  for (const e of history) historyRows.append(historyRow(e));
  const status = h('span', { id: 'live' }, 'connecting…');
  show(main,
    h('h1', {}, 'Address ', h('span', { class: 'mono' }, addr)),
    facts([
      ['balance', h('span', { id: 'balance' }, msat(coins.reduce((a, c) => a + BigInt(c.value_msat), 0n)))],
      ['coins', h('span', { id: 'coin-count' }, String(coins.length))],
      ['live', status],
    ]),
    h('h2', {}, 'Coins'),
    h('div', { class: 'scroll' }, h('table', {}, h('thead', {}, tableRow(['coin', 'value'])), coinRows)),
    h('h2', {}, 'History'),
    h('div', { class: 'scroll' }, h('table', {}, h('thead', {}, tableRow(['', 'transaction', 'coin', 'value', 'block'])), historyRows)));
  const seen = new Set(history.map((e) => `${e.kind}:${e.coin_id}`));
  take = (msg) => {
    const key = `${msg.kind}:${msg.coin_id}`;
    if (seen.has(key)) return;
    seen.add(key);
    const row = historyRow(msg);
    row.classList.add('new');
    historyRows.prepend(row);
    if (msg.kind === 'received' && !held.has(msg.coin_id)) {
      const coin = coinRow(msg);
      held.set(msg.coin_id, [msg, coin]);
      coinRows.prepend(coin);
    } else if (msg.kind === 'spent' && held.has(msg.coin_id)) {
      held.get(msg.coin_id)[1].remove();
      held.delete(msg.coin_id);
    }
    let total = 0n;
    for (const [c] of held.values()) total += BigInt(c.value_msat);
    document.getElementById('balance').textContent = msat(total);
    document.getElementById('coin-count').textContent = String(held.size);
  };
  early.forEach(take);
  status.textContent = await following;
}

function coinRow(c) {
  return tableRow([link.coin(c.coin_id), [{ class: 'num' }, msat(c.value_msat)]]);
}

function historyRow(e) {
  return tableRow([e.kind, link.tx(e.txid), link.coin(e.coin_id), [{ class: 'num' }, `${e.kind === 'spent' ? '−' : '+'}${msat(e.value_msat)}`], link.block(e.block.worker, e.block.height)]);
}

/** Follow the address over the gateway's websocket: ``take`` gets each coin it receives
 * or spends from the subscription on. Resolves to what to say of it once answered. */
function follow(me, addr, take) {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  socket = new WebSocket(`${scheme}://${location.host}/v1/ws`);
  return new Promise((resolve) => {
    socket.onopen = () => socket.send(JSON.stringify({ subscribe: [addr] }));
    socket.onclose = () => {
      resolve('not following (the websocket closed)');
      const status = document.getElementById('live');
      if (me === view && status) status.textContent = 'disconnected (reload to follow again)';
    };
    socket.onmessage = (m) => {
      if (me !== view) return;
      const msg = JSON.parse(m.data);
      if (msg.type === 'subscribed') resolve('following: new payments appear as they commit');
      else if (msg.type === 'error') resolve(`refused: ${msg.code}`);
      else if (msg.type === 'coin') take(msg);
    };
  });
}

async function blocksView(me, worker, before) {
  const q = before ? `&before=${before}` : '';
  const page = await api(`/v1/blocks/${worker}?limit=20${q}`);
  if (me !== view) return;
  const parts = [h('h1', {}, `${page.ledger}'s shard ${worker}: blocks, newest first`)];
  if (!page.blocks.length) parts.push(h('p', { class: 'muted' }, 'no block with coins here yet'));
  for (const b of page.blocks) {
    parts.push(h('h2', { id: `block-${b.height}` }, `Block ${b.height}`));
    const rows = [];
    for (const r of b.records) {
      for (const c of r.changes) rows.push([link.tx(r.txid), r.committed ? `commit, fee ${msat(r.fee_msat)}` : '', c.kind, link.coin(c.coin_id), link.address(c.address), [{ class: 'num' }, msat(c.value_msat)]]);
      if (!r.changes.length) rows.push([link.tx(r.txid), r.committed ? `commit, fee ${msat(r.fee_msat)}` : '', '', '', '', '']);
    }
    parts.push(table(['transaction', 'record', 'change', 'coin', 'owner', 'value'], rows));
  }
  if (page.next !== undefined) parts.push(h('p', {}, h('a', { href: `#/blocks/${worker}?before=${page.next}` }, 'older blocks')));
  show(main, parts);
}

// -- navigation -------------------------------------------------------------------------

async function search(ev) {
  ev.preventDefault();
  const q = document.getElementById('q').value.trim();
  if (HEX64.test(q)) {
    const id = q.toLowerCase();
    // a transaction if one has this id (here, or in a checkpoint); else a coin
    const found = await Promise.allSettled([api(`/v1/tx/${id}`), api(`/v1/lc/tx/${id}`)]);
    location.hash = found.some((f) => f.status === 'fulfilled') ? `#/tx/${id}` : `#/coin/${id}`;
  } else if (q) {
    location.hash = `#/address/${q}`;
  }
}

async function route() {
  const me = ++view;
  clearInterval(timer);
  if (socket) socket.close();
  socket = null;
  const [path, query] = location.hash.slice(1).split('?');
  const params = new URLSearchParams(query || '');
  const [, what, arg] = path.split('/');
  // nothing of the page before stays under this address while this one loads (a
  // verified proof of a transaction read as the coin's)
  show(main, h('p', { class: 'muted', id: 'loading' }, 'loading…'));
  try {
    if (what === 'tx' && HEX64.test(arg)) await txView(me, arg.toLowerCase());
    else if (what === 'coin' && HEX64.test(arg)) await coinView(me, arg.toLowerCase(), params.get('ledger'));
    else if (what === 'address' && arg) await addressView(me, arg);
    else if (what === 'blocks' && /^\d+$/.test(arg)) await blocksView(me, Number(arg), params.get('before'));
    else await guildView(me);
  } catch (e) {
    if (me === view) show(main, h('h1', {}, 'Not found'), h('p', { id: 'error' }, e.code ? `${e.code}: ${e.message}` : e.message));
  }
}

document.getElementById('search').addEventListener('submit', search);
window.addEventListener('hashchange', route);
route();
