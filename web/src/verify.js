// What a light client checks, in the browser: the guild's signed checkpoints and proofs
// under them. The same byte layouts, hashes and rules as constellation/lightclient/proof.py
// (and merkle.py, smt.py, guild.py's Checkpoint.message): a refusal is a ProofRefused whose
// code is the Python error's, so a page names the check that failed the way a wallet does.

import { schnorr } from '@noble/curves/secp256k1.js';
import { sha256 } from '@noble/hashes/sha2.js';

const VERSION = 1;
const MAX_SHARDS = 4096;
const MAX_CHANGES = 1024;
const MAX_PARTS = 64;
const MAX_PROOF_CHECKPOINTS = 16;
const MAX_PATH = 64; // RFC 9162 paths: a tree of fewer than 2**64 leaves
const GUILD_ID_MAX_LEN = 64;
const KEY_BITS = 256;
const PARTITIONS = 1 << 16;
const DESCRIPTOR_HRP = 'cstguild';
const MAX_DESCRIPTOR = 400;
const KEY_VERSION = 1;
const EMPTY = new Uint8Array(32);
const CHANGE_KINDS = { 0: 'spent', 1: 'created', 2: 'paid_out' };

/** A proof (or what it is made of) that does not hold; ``code`` as the Python error's. */
export class ProofRefused extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'ProofRefused';
    this.code = code;
  }
}

const refuse = (code) => (message) => new ProofRefused(code, message);
const malformed = refuse('malformed');
const truncated = refuse('malformed.truncated');
const trailing = refuse('malformed.trailing_bytes');
const badVersion = refuse('malformed.version');
const badCount = refuse('malformed.count');
const badAddress = refuse('malformed.address');
const wrongGuild = refuse('proof.guild');
const wrongMembers = refuse('proof.members');
const badSignature = refuse('proof.checkpoint_signature');
const badHandover = refuse('proof.handover');
const stale = refuse('proof.stale');
const badEntryPath = refuse('proof.entry_path');
const badRecordPath = refuse('proof.record_path');
const badCoinPath = refuse('proof.coin_path');
const wrongSubject = refuse('proof.subject');
const unconfirmed = refuse('proof.unconfirmed');

// -- bytes ------------------------------------------------------------------------------

export function hexToBytes(hex) {
  if (typeof hex !== 'string' || hex.length % 2 || !/^[0-9a-fA-F]*$/.test(hex)) throw malformed('not hex');
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

export function bytesToHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function equal(a, b) {
  if (a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= a[i] ^ b[i];
  return d === 0;
}

const u16 = (n) => new Uint8Array([(n >> 8) & 255, n & 255]);
const u32 = (n) => new Uint8Array([(n >>> 24) & 255, (n >> 16) & 255, (n >> 8) & 255, n & 255]);
function u64(n) {
  const out = new Uint8Array(8);
  let v = BigInt(n);
  for (let i = 7; i >= 0; i--) {
    out[i] = Number(v & 255n);
    v >>= 8n;
  }
  return out;
}

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder('utf-8', { fatal: true });

/** Reads a byte string front to back (constellation.codec.Reader). */
class Reader {
  constructor(data, what) {
    this.data = data;
    this.pos = 0;
    this.what = what;
  }

  take(n) {
    if (this.pos + n > this.data.length) throw truncated(`${this.what}: needs ${this.pos + n} bytes, got ${this.data.length}`);
    const out = this.data.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  u8() {
    return this.take(1)[0];
  }

  u16() {
    const b = this.take(2);
    return (b[0] << 8) | b[1];
  }

  u32() {
    const b = this.take(4);
    return ((b[0] << 24) >>> 0) + (b[1] << 16) + (b[2] << 8) + b[3];
  }

  /** A u64, exact: a Number where it is safe, else a BigInt. */
  u64() {
    let v = 0n;
    for (const b of this.take(8)) v = (v << 8n) | BigInt(b);
    return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
  }

  count(lo, hi, of) {
    const n = this.u16();
    if (n < lo || n > hi) throw badCount(`${this.what}: ${n} ${of}, allowed ${lo}..${hi}`);
    return n;
  }

  small(lo, hi, of) {
    const n = this.u8();
    if (n < lo || n > hi) throw malformed(`${this.what}: ${n} ${of}, allowed ${lo}..${hi}`);
    return n;
  }

  version() {
    const v = this.u8();
    if (v !== VERSION) throw badVersion(`${this.what}: version ${v}, this reads ${VERSION}`);
  }

  guildName() {
    const n = this.u8();
    if (n === 0 || n > GUILD_ID_MAX_LEN) throw malformed(`${this.what}: guild name length out of range`);
    try {
      return fromUtf8.decode(this.take(n));
    } catch {
      throw malformed(`${this.what}: the guild name is not UTF-8`);
    }
  }

  path() {
    const n = this.u8();
    if (n > MAX_PATH) throw malformed(`${this.what}: a path of ${n} hashes`);
    return Array.from({ length: n }, () => this.take(32));
  }

  finish() {
    if (this.pos !== this.data.length) throw trailing(`${this.what}: ${this.data.length - this.pos} bytes after the end`);
  }
}

// -- hashes -----------------------------------------------------------------------------

/** BIP340 tagged hash: sha256(sha256(tag) || sha256(tag) || msg). */
function tagged(tag) {
  const t = sha256(utf8.encode(tag));
  return (msg) => sha256(concat(t, t, msg));
}

const checkpointHash = tagged('Constellation/checkpoint');
const membersHash = tagged('Constellation/members');
const blockStateHash = tagged('Constellation/block-state');
const coinLeafHash = tagged('Constellation/coin-leaf');
const coinNodeHash = tagged('Constellation/coin-node');

/** The commitment to a member set: the threshold, each member's name and x-only key. */
export function membersRoot(threshold, members) {
  const parts = [u16(threshold), u16(members.length)];
  for (const [name, key] of members) {
    const raw = utf8.encode(name);
    parts.push(u16(raw.length), raw, key);
  }
  return membersHash(concat(...parts));
}

/** An entry's commitment to its block: the header hash and the consensus state root. */
export function blockState(block, root) {
  return blockStateHash(concat(block, root));
}

// RFC 9162 Merkle trees: leaves under 0x00, nodes under 0x01.
const merkleLeaf = (leaf) => sha256(concat(new Uint8Array([0]), leaf));
const merkleNode = (l, r) => sha256(concat(new Uint8Array([1]), l, r));

/** Whether ``path`` proves ``leaf`` is leaf ``index`` of the tree of ``size`` leaves
 * whose root is ``root`` (RFC 9162, 2.1.3.2). */
export function merkleVerify(leaf, index, size, path, root) {
  if (!(index >= 0 && index < size) || path.length > MAX_PATH) return false;
  let fn = BigInt(index);
  let sn = BigInt(size) - 1n;
  let r = merkleLeaf(leaf);
  for (const p of path) {
    if (sn === 0n) return false;
    if (fn & 1n || fn === sn) {
      r = merkleNode(p, r);
      while (!(fn & 1n) && fn) {
        fn >>= 1n;
        sn >>= 1n;
      }
    } else {
      r = merkleNode(r, p);
    }
    fn >>= 1n;
    sn >>= 1n;
  }
  return sn === 0n && equal(r, root);
}

// The sparse Merkle tree of coins (smt.py): a key's bit at a depth, most significant first.
const bit = (key, depth) => (key[depth >> 3] >> (7 - (depth & 7))) & 1;

function smtRoot(key, path) {
  let h = path.leafKey.length ? coinLeafHash(concat(path.leafKey, path.leafValue)) : EMPTY;
  for (let depth = path.siblings.length - 1; depth >= 0; depth--) {
    const sibling = path.siblings[depth];
    h = bit(key, depth) ? coinNodeHash(concat(sibling, h)) : coinNodeHash(concat(h, sibling));
  }
  return h;
}

function sharesPrefix(a, b, depth) {
  for (let i = 0; i < depth; i++) if (bit(a, i) !== bit(b, i)) return false;
  return true;
}

// -- bech32m (BIP350): the descriptor, and addresses -----------------------------------------

const CHARSET = 'qpzry9x8gf2tvdw0s3jn54khce6mua7l';
const BECH32M_CONST = 0x2bc830a3;

function polymod(values) {
  const gen = [0x3b6a57b2, 0x26508e6d, 0x1ea119fa, 0x3d4233dd, 0x2a1462b3];
  let chk = 1;
  for (const v of values) {
    const top = chk >>> 25;
    chk = (((chk & 0x1ffffff) << 5) ^ v) >>> 0;
    for (let i = 0; i < 5; i++) if ((top >> i) & 1) chk = (chk ^ gen[i]) >>> 0;
  }
  return chk;
}

const hrpExpand = (hrp) => [...hrp].map((c) => c.charCodeAt(0) >> 5).concat([0], [...hrp].map((c) => c.charCodeAt(0) & 31));

function convertBits(data, from, to, pad) {
  let acc = 0;
  let bits = 0;
  const out = [];
  const maxv = (1 << to) - 1;
  for (const value of data) {
    acc = ((acc << from) | value) & 0xffffff;
    bits += from;
    while (bits >= to) {
      bits -= to;
      out.push((acc >> bits) & maxv);
    }
  }
  if (pad) {
    if (bits) out.push((acc << (to - bits)) & maxv);
  } else if (bits >= from || ((acc << (to - bits)) & maxv)) {
    throw badAddress('non-zero or excess padding');
  }
  return out;
}

function bech32mEncode(hrp, data) {
  const mod = polymod([...hrpExpand(hrp), ...data, 0, 0, 0, 0, 0, 0]) ^ BECH32M_CONST;
  const checksum = Array.from({ length: 6 }, (_, i) => (mod >>> (5 * (5 - i))) & 31);
  return `${hrp}1${[...data, ...checksum].map((d) => CHARSET[d]).join('')}`;
}

function bech32mDecode(text, limit) {
  if (text.length > limit) throw badAddress(`longer than ${limit} characters`);
  if ([...text].some((c) => c.charCodeAt(0) < 33 || c.charCodeAt(0) > 126)) throw badAddress('contains a character outside printable ASCII');
  if (text.toLowerCase() !== text && text.toUpperCase() !== text) throw badAddress('mixes upper and lower case');
  const lower = text.toLowerCase();
  const pos = lower.lastIndexOf('1');
  if (pos < 1 || pos + 7 > lower.length) throw badAddress('missing prefix, separator or checksum');
  const hrp = lower.slice(0, pos);
  const data = [...lower.slice(pos + 1)].map((c) => {
    const v = CHARSET.indexOf(c);
    if (v < 0) throw badAddress(`invalid character '${c}'`);
    return v;
  });
  if (polymod([...hrpExpand(hrp), ...data]) !== BECH32M_CONST) throw badAddress('checksum does not match (a typo?)');
  return [hrp, data.slice(0, -6)];
}

/** The address of an owner key (x-only) under a network's prefix (version 1). */
export function encodeAddress(key, hrp) {
  if (key.length !== 32) throw badAddress('an owner key is 32 bytes');
  return bech32mEncode(hrp, [KEY_VERSION, ...convertBits(key, 8, 5, true)]);
}

// -- what a client pins, and the checkpoints ------------------------------------------------

/** A checkpoint's signed bytes (guild.py Checkpoint.message). */
function checkpointMessage(c) {
  const guild = utf8.encode(c.guild);
  return checkpointHash(concat(u32(guild.length), guild, u64(c.height), c.prevHash, u64(c.timeMs), c.shards, c.members, c.nextKey, c.nextMembers));
}

function readSigned(r) {
  const c = { guild: r.guildName(), height: r.u64(), prevHash: r.take(32), timeMs: r.u64(), shards: r.take(32), members: r.take(32), nextKey: EMPTY.subarray(0, 0), nextMembers: EMPTY.subarray(0, 0) };
  if (r.small(0, 1, 'a handover flag')) {
    c.nextKey = r.take(32);
    c.nextMembers = r.take(32);
  }
  return { checkpoint: c, sig: r.take(64) };
}

export function decodeSignedCheckpoint(data) {
  const r = new Reader(data, 'signed checkpoint');
  const signed = readSigned(r);
  r.finish();
  return signed;
}

/** What a client trusts: the guild's name, its key and member set, and the handovers it
 * followed from them (each naming the key and member set of the checkpoints above it). */
export class Pin {
  constructor(guild, key, members, handovers = []) {
    this.guild = guild;
    this.key = key;
    this.members = members;
    this.handovers = handovers;
  }

  /** The key and member set of the checkpoint at ``height``. */
  at(height) {
    let key = this.key;
    let members = this.members;
    for (const h of this.handovers) {
      if (h.checkpoint.height >= height) break;
      key = h.checkpoint.nextKey;
      members = h.checkpoint.nextMembers;
    }
    return [key, members];
  }

  /** The height of the last handover followed (-1: none). */
  get handed() {
    return this.handovers.length ? this.handovers[this.handovers.length - 1].checkpoint.height : -1;
  }

  /** This pin after handover ``signed``: signed by the key this pin names at its height,
   * above the last handover. */
  follow(signed) {
    const c = verifyCheckpoint(this, signed);
    if (!c.nextKey.length) throw badHandover(`checkpoint ${c.height} hands over to no key`);
    if (c.height <= this.handed) throw badHandover(`handover ${c.height} is not above handover ${this.handed}`);
    return new Pin(this.guild, this.key, this.members, [...this.handovers, signed]);
  }
}

/** What a client pins, as one string (bech32m, cstguild1…): the pin, and the hash of the
 * guild's first checkpoint. */
export const Descriptor = {
  decode(text) {
    let data;
    try {
      const [hrp, words] = bech32mDecode(text.trim(), MAX_DESCRIPTOR);
      if (hrp !== DESCRIPTOR_HRP) throw badAddress(`expected the prefix '${DESCRIPTOR_HRP}', got '${hrp}'`);
      data = new Uint8Array(convertBits(words, 5, 8, false));
    } catch (e) {
      throw malformed(`guild descriptor: ${e.message}`);
    }
    const r = new Reader(data, 'guild descriptor');
    r.version();
    const pin = new Pin(r.guildName(), r.take(32), r.take(32));
    const first = r.take(32);
    r.finish();
    return { pin, first };
  },
};

/** The checkpoint, if it is the pinned guild's, by its member set at its height, signed
 * by its key at its height, and not older than ``notBelow``. */
export function verifyCheckpoint(pin, signed, notBelow = 0) {
  const c = signed.checkpoint;
  if (c.guild !== pin.guild) throw wrongGuild(`checkpoint of guild '${c.guild}', pinned '${pin.guild}'`);
  const [key, members] = pin.at(c.height);
  if (!equal(c.members, members)) throw wrongMembers(`checkpoint ${c.height} names member set ${bytesToHex(c.members).slice(0, 16)}…`);
  let valid = false;
  try {
    valid = schnorr.verify(signed.sig, checkpointMessage(c), key);
  } catch {
    valid = false;
  }
  if (!valid) throw badSignature(`checkpoint ${c.height} is not signed by the guild key`);
  if (c.height < notBelow) throw stale(`checkpoint ${c.height}, but ${notBelow} was seen already`);
  return c;
}

function readEntry(r) {
  return { owner: r.u16(), worker: r.u16(), height: r.u64(), size: r.u32(), records: r.take(32), coins: r.take(32), state: r.take(32) };
}

function encodeEntry(e) {
  return concat(u16(e.owner), u16(e.worker), u64(e.height), u32(e.size), e.records, e.coins, e.state);
}

/** A signed checkpoint and its entries, as the gateway serves it (``encoded``). */
export function decodeAnnounced(data) {
  const r = new Reader(data, 'announced checkpoint');
  const signed = readSigned(r);
  const entries = Array.from({ length: r.count(1, MAX_SHARDS, 'entries') }, () => readEntry(r));
  r.finish();
  return { signed, entries };
}

function readEntryProof(r) {
  const entry = readEntry(r);
  const position = r.u16();
  const size = r.u16();
  if (!(position < size && size <= MAX_SHARDS)) throw malformed(`${r.what}: entry ${position} of ${size}, at most ${MAX_SHARDS}`);
  return { entry, position, size, path: r.path() };
}

function verifyEntry(proof, checkpoint) {
  if (!merkleVerify(encodeEntry(proof.entry), proof.position, proof.size, proof.path, checkpoint.shards)) {
    const e = proof.entry;
    throw badEntryPath(`shard ${e.owner}/${e.worker} at ${e.height} is not under checkpoint ${checkpoint.height}`);
  }
  return proof.entry;
}

// -- transactions ---------------------------------------------------------------------------

/** One transaction's changes in one shard's block (proof.py Record). */
export function decodeRecord(data) {
  const r = new Reader(data, 'record');
  const height = r.u64();
  const txid = r.take(32);
  const committed = r.u8();
  const feeMsat = r.u64();
  if (committed > 1) throw malformed('record: committed is 0 or 1');
  const changes = [];
  for (let n = r.count(0, MAX_CHANGES, 'changes'); n > 0; n--) {
    const kind = CHANGE_KINDS[r.u8()];
    if (!kind) throw malformed('record: unknown kind of change');
    const change = { kind, coin_id: r.take(32), owner: r.take(32), value_msat: r.u64() };
    if (kind === 'paid_out') change.ledger = r.take(8);
    changes.push(change);
  }
  r.finish();
  return { height, txid, committed: committed === 1, fee_msat: feeMsat, changes };
}

export function decodeTxProof(data) {
  const r = new Reader(data, 'transaction proof');
  r.version();
  const txid = r.take(32);
  const checkpoints = Array.from({ length: r.small(1, MAX_PROOF_CHECKPOINTS, 'checkpoints') }, () => readSigned(r));
  const parts = [];
  for (let n = r.small(1, MAX_PARTS, 'parts'); n > 0; n--) {
    const checkpoint = r.u8();
    const entry = readEntryProof(r);
    if (checkpoint >= checkpoints.length) throw malformed('transaction proof: a part names a checkpoint it lacks');
    const shown = r.take(r.u16());
    if (shown.length < 8) throw malformed('transaction proof: a record shorter than its height');
    const record = concat(shown.subarray(0, 8), txid, shown.subarray(8)); // the txid is the proof's
    parts.push({ checkpoint, entry, record, position: r.u32(), path: r.path() });
  }
  r.finish();
  return { txid, checkpoints, parts };
}

/** The transaction's records, each checked up to a signed checkpoint, each once; refused
 * unless one is its commit. Each: {owner, worker, checkpoint (its height), record}. */
export function verifyTx(pin, proof, txid) {
  if (!equal(proof.txid, txid)) throw wrongSubject(`the proof is of transaction ${bytesToHex(proof.txid)}, not ${bytesToHex(txid)}`);
  const checkpoints = proof.checkpoints.map((c) => verifyCheckpoint(pin, c));
  const placed = [];
  for (const part of proof.parts) {
    const checkpoint = checkpoints[part.checkpoint];
    const entry = verifyEntry(part.entry, checkpoint);
    if (!merkleVerify(part.record, part.position, entry.size, part.path, entry.records)) {
      throw badRecordPath(`record ${part.position} is not among shard ${entry.owner}/${entry.worker}'s records under checkpoint ${checkpoint.height}`);
    }
    const record = decodeRecord(part.record);
    if (!equal(record.txid, txid)) throw wrongSubject(`a record of transaction ${bytesToHex(record.txid)}, not ${bytesToHex(txid)}`);
    if (BigInt(record.height) > BigInt(entry.height)) throw badRecordPath(`a record at height ${record.height}, above its entry's`);
    if (placed.some((p) => p.owner === entry.owner && p.worker === entry.worker && p.record.height === record.height)) {
      throw badRecordPath(`shard ${entry.owner}/${entry.worker}'s record at ${record.height} is shown twice`);
    }
    placed.push({ owner: entry.owner, worker: entry.worker, checkpoint: checkpoint.height, record });
  }
  if (!placed.some((p) => p.record.committed)) throw unconfirmed(`no record shows transaction ${bytesToHex(txid)} committed`);
  return placed;
}

// -- coins ----------------------------------------------------------------------------------

/** The worker of a member's ledger that holds a coin (the even partition map). */
export function shardOf(coinId, workers) {
  const partition = (coinId[0] << 8) | coinId[1];
  for (let w = 0; w < workers; w++) {
    if (partition < Math.floor((PARTITIONS * (w + 1)) / workers)) return w;
  }
  throw malformed('a ledger has at least one worker');
}

export function decodeCoinProof(data) {
  const r = new Reader(data, 'coin proof');
  r.version();
  const coinId = r.take(32);
  const checkpoint = readSigned(r);
  const entry = readEntryProof(r);
  const depth = r.u16();
  if (depth > KEY_BITS) throw malformed('coin proof: deeper than the key');
  const present = r.take((depth + 7) >> 3); // little-endian bits: sibling i present
  for (let i = depth; i < present.length * 8; i++) {
    if ((present[i >> 3] >> (i & 7)) & 1) throw malformed("coin proof: bits set past the path's depth");
  }
  const siblings = Array.from({ length: depth }, (_, i) => ((present[i >> 3] >> (i & 7)) & 1 ? r.take(32) : EMPTY));
  const terminal = r.u8();
  if (terminal > 1) throw malformed('coin proof: unknown end of path');
  let leafKey = EMPTY.subarray(0, 0);
  let leafValue = EMPTY.subarray(0, 0);
  if (terminal) {
    leafKey = r.take(32);
    leafValue = r.take(r.u16());
  }
  r.finish();
  return { coinId, checkpoint, entry, path: { siblings, leafKey, leafValue } };
}

function decodeLeaf(data) {
  const r = new Reader(data, 'coin leaf');
  const state = r.u8();
  if (state > 1) throw malformed('coin leaf: unknown state');
  const leaf = { state: state ? 'unspent' : 'spent', value_msat: r.u64(), owner: r.take(32), txid: r.take(32), height: r.u64() };
  r.finish();
  return leaf;
}

/** The coin's state as of the proof's checkpoint, in ``shard`` ([owner, worker]: the shard
 * that holds its partition): {checkpoint, owner, worker, leaf} (leaf null: no such coin). */
export function verifyCoin(pin, proof, coinId, shard, notBelow = 0) {
  if (!equal(proof.coinId, coinId)) throw wrongSubject(`the proof is of coin ${bytesToHex(proof.coinId)}, not ${bytesToHex(coinId)}`);
  const checkpoint = verifyCheckpoint(pin, proof.checkpoint, notBelow);
  const entry = verifyEntry(proof.entry, checkpoint);
  if (entry.owner !== shard[0] || entry.worker !== shard[1]) {
    throw wrongSubject(`the proof is from shard ${entry.owner}/${entry.worker}, not ${shard[0]}/${shard[1]}`);
  }
  const path = proof.path;
  if (!equal(smtRoot(coinId, path), entry.coins)) {
    throw badCoinPath(`coin ${bytesToHex(coinId)} does not lead to shard ${entry.owner}/${entry.worker}'s coin root at checkpoint ${checkpoint.height}`);
  }
  const verdict = { checkpoint: checkpoint.height, owner: entry.owner, worker: entry.worker, leaf: null };
  if (path.leafKey.length && !equal(path.leafKey, coinId)) {
    if (!sharesPrefix(path.leafKey, coinId, path.siblings.length)) throw badCoinPath('the leaf shown in place of the coin is not on its path');
    return verdict;
  }
  if (path.leafKey.length) verdict.leaf = decodeLeaf(path.leafValue);
  return verdict;
}
