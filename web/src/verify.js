// What a light client checks, in the browser: the guild's signed checkpoints, and proofs
// under them. A port of constellation/lightclient/proof.py (with merkle.py, smt.py,
// guild.py's Checkpoint.message, hashing.py's tagged hashes, codec.py's Reader, keys.py's
// schnorr_verify and address.py's bech32m): the same byte layouts, hashes, bounds and
// checks, in the same order, so that a page refuses what a wallet refuses, and with the
// same code (a ProofRefused whose code is the Python error's).
//
// What is decoded keeps the Python names of its fields (prev_hash, fee_msat, coin_id...),
// as the gateway's JSON does: bytes are Uint8Arrays, u16 and u32 values Numbers, and u64
// values (heights, times, amounts) always BigInts, exact to 2**64 - 1. A function taking
// a height or an amount takes a Number or a BigInt.

import { schnorr } from '@noble/curves/secp256k1.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { bytesToHex, concatBytes, hexToBytes as parseHex, utf8ToBytes } from '@noble/hashes/utils.js';

export { bytesToHex };

const VERSION = 1;
const MAX_SHARDS = 4096;
const MAX_CHANGES = 1024; // a record's coin changes
const MAX_PARTS = 64; // shards one transaction proof covers
const MAX_PROOF_CHECKPOINTS = 16; // checkpoints one transaction proof spans
const MAX_PATH = 64; // an RFC 9162 path: a tree of fewer than 2**64 leaves
const KEY_BITS = 256; // a coin tree's keys
const GUILD_ID_MAX_LEN = 64; // bytes of UTF-8
const DESCRIPTOR_HRP = 'cstguild';
const MAX_DESCRIPTOR = 400; // characters
const KEY_VERSION = 1; // an address of an owner key (address.py)
const PARTITIONS = 1 << 16; // tx.py
const NOTHING = new Uint8Array(0);
const EMPTY = new Uint8Array(32); // an empty subtree of the coin tree
const CHANGE_KINDS = ['spent', 'created', 'paid_out']; // proof.py ChangeKind, by value
const COIN_STATES = ['spent', 'unspent']; // proof.py CoinState, by value

// -- refusals ---------------------------------------------------------------------------

/** A checkpoint or proof (or its encoding) that does not hold: ``code`` is the code of
 * the error Python's verifier raises there (constellation/errors.py). */
export class ProofRefused extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'ProofRefused';
    this.code = code;
  }
}

/** A refusal with ``code``; a proof check's message starts with what it checks, as
 * errors.py's ProofRefused subclasses do. */
function refusal(code, check = '') {
  return (message) => new ProofRefused(code, check ? `${check}: ${message}` : message);
}

const malformed = refusal('malformed'); // DecodeError
const truncated = refusal('malformed.truncated');
const trailingBytes = refusal('malformed.trailing_bytes');
const unsupportedVersion = refusal('malformed.version');
const countOutOfRange = refusal('malformed.count');
const invalidAddress = refusal('malformed.address');
const wrongGuild = refusal('proof.guild', 'guild');
const wrongMembers = refusal('proof.members', 'member set');
const badCheckpointSignature = refusal('proof.checkpoint_signature', 'checkpoint signature');
const badHandover = refusal('proof.handover', 'handover');
const staleCheckpoint = refusal('proof.stale', 'checkpoint height');
const badEntryPath = refusal('proof.entry_path', 'shard entry path');
const badRecordPath = refusal('proof.record_path', 'record path');
const badCoinPath = refusal('proof.coin_path', 'coin path');
const wrongSubject = refusal('proof.subject', 'subject');
const unconfirmed = refusal('proof.unconfirmed', 'commit record');

// -- bytes ------------------------------------------------------------------------------

/** Bytes from hex (either case), as the gateway's answers carry them. */
export function hexToBytes(hex) {
  try {
    return parseHex(hex);
  } catch (e) {
    throw malformed(`not hex: ${e.message}`);
  }
}

function equal(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** ``n`` big-endian in ``size`` bytes; out of range, a RangeError (as struct.pack's). */
function uint(n, size) {
  let v = BigInt(n);
  if (v < 0n || v >> BigInt(8 * size)) throw new RangeError(`${n} does not fit in ${size} bytes`);
  const out = new Uint8Array(size);
  for (let i = size - 1; i >= 0; i--, v >>= 8n) out[i] = Number(v & 255n);
  return out;
}

const u16 = (n) => uint(n, 2);
const u32 = (n) => uint(n, 4);
const u64 = (n) => uint(n, 8);

// Python's bytes.decode(): a BOM is kept as U+FEFF, never dropped.
const utf8Decoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/** Reads a byte string front to back (codec.py Reader): each read checks the length
 * left (Truncated), ``finish`` refuses trailing bytes. Big-endian, no varints. */
class Reader {
  constructor(data, what) {
    this.data = data;
    this.pos = 0;
    this.what = what;
  }

  bytes(n) {
    const end = this.pos + n;
    if (end > this.data.length) {
      throw truncated(`${this.what}: needs ${end} bytes, got ${this.data.length}`);
    }
    const out = this.data.subarray(this.pos, end);
    this.pos = end;
    return out;
  }

  u8() {
    return this.bytes(1)[0];
  }

  u16() {
    const b = this.bytes(2);
    return (b[0] << 8) | b[1];
  }

  /** proof.py's ``_u32``. */
  u32() {
    const b = this.bytes(4);
    return b[0] * 2 ** 24 + ((b[1] << 16) | (b[2] << 8) | b[3]);
  }

  u64() {
    let v = 0n;
    for (const b of this.bytes(8)) v = (v << 8n) | BigInt(b);
    return v;
  }

  /** A u16 element count that must lie in ``lo..hi``. */
  count(lo, hi, of) {
    const n = this.u16();
    if (n < lo || n > hi) throw countOutOfRange(`${this.what}: ${n} ${of}, allowed ${lo}..${hi}`);
    return n;
  }

  finish() {
    if (this.pos !== this.data.length) {
      throw trailingBytes(`${this.what}: ${this.data.length - this.pos} bytes after the end`);
    }
  }
}

// proof.py's encoding helpers, over a Reader.

/** A guild's name: its length (1 byte, 1..64), then UTF-8. */
function readGuildName(r) {
  const n = r.u8();
  if (n === 0 || n > GUILD_ID_MAX_LEN) throw malformed(`${r.what}: guild name length out of range`);
  try {
    return utf8Decoder.decode(r.bytes(n));
  } catch (e) {
    if (e instanceof ProofRefused) throw e;
    throw malformed(`${r.what}: the guild name is not UTF-8`);
  }
}

/** A Merkle path: its length (1 byte, at most MAX_PATH), then the hashes. */
function readPath(r) {
  const n = r.u8();
  if (n > MAX_PATH) throw malformed(`${r.what}: a path of ${n} hashes`);
  return Array.from({ length: n }, () => r.bytes(32));
}

/** A one-byte count that must lie in ``lo..hi`` (a DecodeError, not a CountOutOfRange,
 * as in proof.py's ``_small``). */
function readSmall(r, lo, hi, of) {
  const n = r.u8();
  if (n < lo || n > hi) throw malformed(`${r.what}: ${n} ${of}, allowed ${lo}..${hi}`);
  return n;
}

function readVersion(r) {
  const v = r.u8();
  if (v !== VERSION) throw unsupportedVersion(`${r.what}: version ${v}, this reads ${VERSION}`);
}

// -- hashes ------------------------------------------------------------------------------

/** hashing.py's tagged hash, sha256(sha256(tag) || sha256(tag) || msg), the tag's
 * prefix absorbed once. */
function taggedHasher(tag) {
  const t = sha256(utf8ToBytes(tag));
  const midstate = sha256.create().update(t).update(t);
  return (msg) => midstate.clone().update(msg).digest();
}

const checkpointHash = taggedHasher('Constellation/checkpoint');
const membersHash = taggedHasher('Constellation/members');
const blockStateHash = taggedHasher('Constellation/block-state');
const coinLeafHash = taggedHasher('Constellation/coin-leaf');
const coinNodeHash = taggedHasher('Constellation/coin-node');

/** The commitment to a member set: the threshold, and each member's name and x-only
 * operator key (``[name, key]``), in the guild's order. */
export function membersRoot(threshold, members) {
  const data = [u16(threshold), u16(members.length)];
  for (const [name, key] of members) {
    const raw = utf8ToBytes(name);
    data.push(u16(raw.length), raw, key);
  }
  return membersHash(concatBytes(...data));
}

/** An entry's commitment to its block: the header hash and the consensus state root. */
export function blockState(block, root) {
  return blockStateHash(concatBytes(block, root));
}

// -- RFC 9162 Merkle trees (merkle.py): leaves under 0x00, nodes under 0x01 ----------------

const merkleLeaf = (leaf) => sha256(concatBytes(Uint8Array.of(0), leaf));
const merkleNode = (left, right) => sha256(concatBytes(Uint8Array.of(1), left, right));

/** The root of the tree over ``leaves``: each level pairs its nodes left to right and
 * carries an unpaired last one up unchanged. */
function merkleRoot(leaves) {
  if (!leaves.length) return sha256(NOTHING);
  let level = leaves.map(merkleLeaf);
  while (level.length > 1) {
    const up = [];
    for (let i = 0; i + 1 < level.length; i += 2) up.push(merkleNode(level[i], level[i + 1]));
    if (level.length % 2) up.push(level[level.length - 1]);
    level = up;
  }
  return level[0];
}

/** Whether ``path`` proves ``leaf`` is leaf ``index`` of the tree of ``size`` leaves
 * whose root is ``root`` (RFC 9162, 2.1.3.2). BigInts: a size is up to 2**32 - 1. */
function verifyPath(leaf, index, size, path, root) {
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

// -- the sparse Merkle tree of coins (smt.py) ------------------------------------------------

/** Bit ``depth`` of a 32-byte key, the most significant first. */
const bit = (key, depth) => (key[depth >> 3] >> (7 - (depth & 7))) & 1;

/** The root that ``path`` leads to from ``key``'s place (smt.py's ``path_root``). */
function coinPathRoot(key, path) {
  let h = path.leaf_key.length ? coinLeafHash(concatBytes(path.leaf_key, path.leaf_value)) : EMPTY;
  for (let depth = path.siblings.length - 1; depth >= 0; depth--) {
    const sibling = path.siblings[depth];
    h = coinNodeHash(bit(key, depth) ? concatBytes(sibling, h) : concatBytes(h, sibling));
  }
  return h;
}

/** Whether two keys share their first ``depth`` bits. */
function sharesPrefix(a, b, depth) {
  for (let i = 0; i < depth; i++) if (bit(a, i) !== bit(b, i)) return false;
  return true;
}

// -- BIP340 (keys.py) -------------------------------------------------------------------

/** A BIP340 signature over a message of any length, under an x-only key; never throws.
 * (noble refuses s = 0, which libsecp256k1 accepts: a signature no signer makes but with
 * probability 2**-256.) */
function schnorrVerify(pubkey, msg, sig) {
  if (sig.length !== 64 || pubkey.length !== 32) return false;
  try {
    return schnorr.verify(sig, msg, pubkey);
  } catch {
    return false; // not a key (not on the curve): keys.py says False
  }
}

/** Whether ``key`` is the x coordinate of a point of secp256k1. */
function isValidXonly(key) {
  if (key.length !== 32) return false;
  try {
    schnorr.utils.lift_x(BigInt(`0x${bytesToHex(key)}`));
    return true;
  } catch {
    return false;
  }
}

// -- bech32m (BIP350, address.py) --------------------------------------------------------

const CHARSET = 'qpzry9x8gf2tvdw0s3jn54khce6mua7l';
const BECH32M_CONST = 0x2bc830a3;
const GENERATOR = [0x3b6a57b2, 0x26508e6d, 0x1ea119fa, 0x3d4233dd, 0x2a1462b3];

function polymod(values) {
  let chk = 1;
  for (const v of values) {
    const top = chk >>> 25;
    chk = ((chk & 0x1ffffff) << 5) ^ v;
    for (let i = 0; i < 5; i++) if ((top >> i) & 1) chk ^= GENERATOR[i];
  }
  return chk >>> 0;
}

function hrpExpand(hrp) {
  const codes = Array.from(hrp, (c) => c.charCodeAt(0));
  return [...codes.map((c) => c >> 5), 0, ...codes.map((c) => c & 31)];
}

/** Regroups bits (8 to 5 with ``pad``, 5 to 8 without, refusing non-zero padding). */
function convertBits(data, fromBits, toBits, pad) {
  let acc = 0;
  let bits = 0;
  const out = [];
  const maxv = (1 << toBits) - 1;
  for (const value of data) {
    acc = ((acc << fromBits) | value) & 0xfff; // more than fromBits + toBits are never read
    bits += fromBits;
    while (bits >= toBits) {
      bits -= toBits;
      out.push((acc >> bits) & maxv);
    }
  }
  if (pad) {
    if (bits) out.push((acc << (toBits - bits)) & maxv);
  } else if (bits >= fromBits || (acc << (toBits - bits)) & maxv) {
    throw invalidAddress('non-zero or excess padding');
  }
  return out;
}

function bech32mEncode(hrp, data) {
  const mod = polymod([...hrpExpand(hrp), ...data, 0, 0, 0, 0, 0, 0]) ^ BECH32M_CONST;
  const checksum = Array.from({ length: 6 }, (_, i) => (mod >>> (5 * (5 - i))) & 31);
  return `${hrp}1${[...data, ...checksum].map((d) => CHARSET[d]).join('')}`;
}

/** A bech32m string's HRP and 5-bit data, every BIP350 rule checked but the length (up
 * to ``limit`` characters). */
function bech32mDecode(text, limit) {
  if (text.length > limit) throw invalidAddress(`longer than ${limit} characters`);
  for (const c of text) {
    const code = c.codePointAt(0);
    if (code < 33 || code > 126) throw invalidAddress('contains a character outside printable ASCII');
  }
  if (text.toLowerCase() !== text && text.toUpperCase() !== text) {
    throw invalidAddress('mixes upper and lower case');
  }
  const lower = text.toLowerCase();
  const pos = lower.lastIndexOf('1');
  if (pos < 1 || pos + 7 > lower.length) throw invalidAddress('missing prefix, separator or checksum');
  const hrp = lower.slice(0, pos);
  const data = Array.from(lower.slice(pos + 1), (c) => {
    const v = CHARSET.indexOf(c);
    if (v < 0) throw invalidAddress(`invalid character '${c}'`);
    return v;
  });
  if (polymod([...hrpExpand(hrp), ...data]) !== BECH32M_CONST) {
    throw invalidAddress('checksum does not match (a typo?)');
  }
  return [hrp, data.slice(0, -6)];
}

/** The address (version 1) of an owner key (x-only) under a network's prefix (``cst``,
 * ``tcst``, ``rcst``), as address.py's ``encode_address`` without a ledger. */
export function encodeAddress(key, hrp) {
  if (!isValidXonly(key)) throw invalidAddress(`not a BIP340 public key: ${bytesToHex(key)}`);
  return bech32mEncode(hrp, [KEY_VERSION, ...convertBits(key, 8, 5, true)]);
}

// -- checkpoints, and what a client pins ---------------------------------------------------

/** What the guild key signs for a checkpoint (guild.py's ``Checkpoint.message``). */
export function checkpointMessage(c) {
  const guild = utf8ToBytes(c.guild);
  return checkpointHash(
    concatBytes(
      u32(guild.length),
      guild,
      u64(c.height),
      c.prev_hash,
      u64(c.time_ms),
      c.shards,
      c.members,
      c.next_key, // both empty or both 32 bytes: the length says which
      c.next_members,
    ),
  );
}

/** A signed checkpoint: ``{checkpoint: {guild, height, prev_hash, time_ms, shards,
 * members, next_key, next_members}, sig}`` (next_key and next_members empty but in a
 * handover). */
function readSignedCheckpoint(r) {
  const checkpoint = {
    guild: readGuildName(r),
    height: r.u64(),
    prev_hash: r.bytes(32),
    time_ms: r.u64(),
    shards: r.bytes(32),
    members: r.bytes(32),
    next_key: NOTHING,
    next_members: NOTHING,
  };
  if (readSmall(r, 0, 1, 'a handover flag')) {
    checkpoint.next_key = r.bytes(32);
    checkpoint.next_members = r.bytes(32);
  }
  return { checkpoint, sig: r.bytes(64) };
}

/** A signed checkpoint's bytes, as ``/v1/lc/handovers`` serves them (``encoded``). */
export function decodeSignedCheckpoint(data) {
  const r = new Reader(data, 'signed checkpoint');
  const signed = readSignedCheckpoint(r);
  r.finish();
  return signed;
}

/** What a client trusts: the guild's name, its key (x-only) and member set, and the
 * handovers it followed from them (signed checkpoints, in height order), each naming the
 * key and member set of the checkpoints above it. */
export class Pin {
  constructor(guild, key, members, handovers = []) {
    this.guild = guild;
    this.key = key;
    this.members = members;
    this.handovers = Object.freeze([...handovers]);
    Object.freeze(this);
  }

  /** ``[key, members]`` of the checkpoint at ``height``. */
  at(height) {
    let key = this.key;
    let members = this.members;
    for (const h of this.handovers) {
      if (h.checkpoint.height >= height) break;
      key = h.checkpoint.next_key;
      members = h.checkpoint.next_members;
    }
    return [key, members];
  }

  /** The height of the last handover followed (-1n: none). */
  get handed() {
    const last = this.handovers[this.handovers.length - 1];
    return last ? last.checkpoint.height : -1n;
  }

  /** This pin after handover ``signed`` (a new Pin): checked to be signed by the key this
   * pin names at its height, to name a next key, and to be above the last handover. */
  follow(signed) {
    const c = verifyCheckpoint(this, signed);
    if (!c.next_key.length) throw badHandover(`checkpoint ${c.height} hands over to no key`);
    if (c.height <= this.handed) {
      throw badHandover(`handover ${c.height} is not above handover ${this.handed}`);
    }
    return new Pin(this.guild, this.key, this.members, [...this.handovers, signed]);
  }
}

/** Python's str.strip(): its whitespace (which has U+001C..U+001F and U+0085, and not
 * U+FEFF, unlike String.prototype.trim). */
const PY_SPACE = '\\t-\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000';
const PY_STRIP = new RegExp(`^[${PY_SPACE}]+|[${PY_SPACE}]+$`, 'g');

/** What a client pins, as one string (bech32m, ``cstguild1…``): the pin, and ``first``,
 * the message of the guild's first checkpoint, where the chain it follows starts. */
export class Descriptor {
  constructor(pin, first) {
    this.pin = pin;
    this.first = first;
    Object.freeze(this);
  }

  static decode(text) {
    let data;
    try {
      const [hrp, words] = bech32mDecode(text.replace(PY_STRIP, ''), MAX_DESCRIPTOR);
      if (hrp !== DESCRIPTOR_HRP) {
        throw invalidAddress(`expected the prefix '${DESCRIPTOR_HRP}', got '${hrp}'`);
      }
      data = Uint8Array.from(convertBits(words, 5, 8, false));
    } catch (e) {
      if (!(e instanceof ProofRefused)) throw e;
      throw malformed(`guild descriptor: ${e.message}`);
    }
    const r = new Reader(data, 'guild descriptor');
    readVersion(r);
    const pin = new Pin(readGuildName(r), r.bytes(32), r.bytes(32));
    const first = r.bytes(32);
    r.finish();
    return new Descriptor(pin, first);
  }
}

/** The checkpoint of ``signed``, if it is the pinned guild's, names its member set at
 * its height, is signed by its key at its height, and is not older than ``notBelow``
 * (the highest the caller has seen, where it needs the latest state). */
export function verifyCheckpoint(pin, signed, notBelow = 0n) {
  const c = signed.checkpoint;
  if (c.guild !== pin.guild) throw wrongGuild(`checkpoint of guild '${c.guild}', pinned '${pin.guild}'`);
  const [key, members] = pin.at(c.height);
  if (!equal(c.members, members)) {
    throw wrongMembers(`checkpoint ${c.height} names member set ${bytesToHex(c.members).slice(0, 16)}…`);
  }
  if (!schnorrVerify(key, checkpointMessage(c), signed.sig)) {
    throw badCheckpointSignature(`checkpoint ${c.height} is not signed by the guild key`);
  }
  if (c.height < notBelow) throw staleCheckpoint(`checkpoint ${c.height}, but ${notBelow} was seen already`);
  return c;
}

// -- shard entries ------------------------------------------------------------------------

/** A shard's entry: ``{owner, worker, height, size, records, coins, state}``. */
function readShardEntry(r) {
  return {
    owner: r.u16(),
    worker: r.u16(),
    height: r.u64(),
    size: r.u32(), // how many records the records tree has
    records: r.bytes(32), // RFC 9162 root over the records since the previous checkpoint
    coins: r.bytes(32), // the coin tree's root after the block at ``height``
    state: r.bytes(32), // blockState() of that block
  };
}

function encodeShardEntry(e) {
  return concatBytes(u16(e.owner), u16(e.worker), u64(e.height), u32(e.size), e.records, e.coins, e.state);
}

/** A signed checkpoint and its entries, as ``/v1/lc/checkpoints`` serves it
 * (``encoded``: checkpointer.py's Announced): ``{signed, entries}``. */
export function decodeAnnounced(data) {
  const r = new Reader(data, 'announced checkpoint');
  const signed = readSignedCheckpoint(r);
  const entries = Array.from({ length: r.count(1, MAX_SHARDS, 'entries') }, () => readShardEntry(r));
  r.finish();
  return { signed, entries };
}

/** An announced checkpoint whose entries may be shown: ``{checkpoint, entries}``, its
 * checkpoint verified (``verifyCheckpoint``) and its entries the ones its ``shards`` root
 * is over (the checks checkpointer.py's ``verify_filled`` makes, less the records, which a
 * page is not sent). */
export function verifyAnnounced(pin, announced, notBelow = 0n) {
  const checkpoint = verifyCheckpoint(pin, announced.signed, notBelow);
  if (!equal(merkleRoot(announced.entries.map(encodeShardEntry)), checkpoint.shards)) {
    throw badEntryPath(`checkpoint ${checkpoint.height}'s entries do not make its root`);
  }
  return { checkpoint, entries: announced.entries };
}

/** A shard's entry and its place in a checkpoint's tree of ``size`` entries:
 * ``{entry, position, size, path}``. */
function readEntryProof(r) {
  const entry = readShardEntry(r);
  const position = r.u16();
  const size = r.u16();
  if (!(position < size && size <= MAX_SHARDS)) {
    throw malformed(`${r.what}: entry ${position} of ${size}, at most ${MAX_SHARDS}`);
  }
  return { entry, position, size, path: readPath(r) };
}

/** The entry of an entry proof, if it is under ``checkpoint``'s shards root. */
function verifyEntryProof(proof, checkpoint) {
  const e = proof.entry;
  if (!verifyPath(encodeShardEntry(e), proof.position, proof.size, proof.path, checkpoint.shards)) {
    throw badEntryPath(
      `shard ${e.owner}/${e.worker} at ${e.height} is not under checkpoint ${checkpoint.height}`,
    );
  }
  return e;
}

// -- transactions --------------------------------------------------------------------------

/** One transaction's (or issuance's) changes in one shard's block: ``{height, txid,
 * committed, fee_msat, changes: [{kind, coin_id, owner, value_msat, ledger}]}``, kind
 * 'spent', 'created' or 'paid_out' (ledger: the other ledger's id, else empty). */
function decodeRecord(data) {
  const r = new Reader(data, 'record');
  const height = r.u64();
  const txid = r.bytes(32);
  const committed = r.u8();
  const fee_msat = r.u64();
  if (committed > 1) throw malformed('record: committed is 0 or 1');
  const changes = [];
  for (let n = r.count(0, MAX_CHANGES, 'changes'); n > 0; n--) {
    const kind = CHANGE_KINDS[r.u8()];
    if (kind === undefined) throw malformed('record: unknown kind of change');
    const coin_id = r.bytes(32);
    const owner = r.bytes(32);
    const value_msat = r.u64();
    const ledger = kind === 'paid_out' ? r.bytes(8) : NOTHING;
    changes.push({ kind, coin_id, owner, value_msat, ledger });
  }
  r.finish();
  return { height, txid, committed: committed === 1, fee_msat, changes };
}

/** A transaction proof (``/v1/lc/tx/{txid}``'s ``proof``): ``{txid, checkpoints, parts:
 * [{checkpoint (an index into checkpoints), entry, record (encoded), position, path}]}``. */
export function decodeTxProof(data) {
  const r = new Reader(data, 'transaction proof');
  readVersion(r);
  const txid = r.bytes(32);
  const n = readSmall(r, 1, MAX_PROOF_CHECKPOINTS, 'checkpoints');
  const checkpoints = Array.from({ length: n }, () => readSignedCheckpoint(r));
  const parts = [];
  for (let k = readSmall(r, 1, MAX_PARTS, 'parts'); k > 0; k--) {
    const checkpoint = r.u8();
    const entry = readEntryProof(r);
    if (checkpoint >= checkpoints.length) {
      throw malformed('transaction proof: a part names a checkpoint it lacks');
    }
    const shown = r.bytes(r.u16());
    if (shown.length < 8) throw malformed('transaction proof: a record shorter than its height');
    const record = concatBytes(shown.subarray(0, 8), txid, shown.subarray(8)); // the txid is the proof's
    parts.push({ checkpoint, entry, record, position: r.u32(), path: readPath(r) });
  }
  r.finish();
  return { txid, checkpoints, parts };
}

/** The transaction's records, each checked up to a signed checkpoint, each once; refused
 * unless one is its commit (the coordinator's record). Each is ``{owner, worker,
 * checkpoint (its height), record}`` (proof.py's Placed). */
export function verifyTx(pin, proof, txid) {
  if (!equal(proof.txid, txid)) {
    throw wrongSubject(`the proof is of transaction ${bytesToHex(proof.txid)}, not ${bytesToHex(txid)}`);
  }
  const checkpoints = proof.checkpoints.map((c) => verifyCheckpoint(pin, c));
  const placed = [];
  for (const part of proof.parts) {
    const checkpoint = checkpoints[part.checkpoint];
    const entry = verifyEntryProof(part.entry, checkpoint);
    if (!verifyPath(part.record, part.position, entry.size, part.path, entry.records)) {
      throw badRecordPath(
        `record ${part.position} is not among shard ${entry.owner}/${entry.worker}'s records ` +
          `under checkpoint ${checkpoint.height}`,
      );
    }
    const record = decodeRecord(part.record);
    if (!equal(record.txid, txid)) {
      throw wrongSubject(`a record of transaction ${bytesToHex(record.txid)}, not ${bytesToHex(txid)}`);
    }
    if (record.height > entry.height) {
      throw badRecordPath(`a record at height ${record.height}, above its entry's`);
    }
    const shown = (p) =>
      p.owner === entry.owner && p.worker === entry.worker && p.record.height === record.height;
    if (placed.some(shown)) {
      throw badRecordPath(`shard ${entry.owner}/${entry.worker}'s record at ${record.height} is shown twice`);
    }
    placed.push({ owner: entry.owner, worker: entry.worker, checkpoint: checkpoint.height, record });
  }
  if (!placed.some((p) => p.record.committed)) {
    throw unconfirmed(`no record shows transaction ${bytesToHex(txid)} committed`);
  }
  return placed;
}

// -- coins -----------------------------------------------------------------------------------

/** The worker of a member's ledger of ``workers`` workers that holds a coin, by the even
 * partition map (pmap.py's ``PartitionMap.even``, tx.py's ``partition_of``). */
export function shardOf(coinId, workers) {
  if (!(Number.isInteger(workers) && workers >= 1 && workers <= PARTITIONS)) {
    throw malformed(`workers must be in 1..${PARTITIONS}`);
  }
  const partition = (coinId[0] << 8) | coinId[1];
  let worker = 0;
  while (partition >= Math.floor((PARTITIONS * (worker + 1)) / workers)) worker++;
  return worker;
}

/** A coin proof (``/v1/lc/coin/{coin_id}``'s ``proof``): ``{coin_id, checkpoint, entry,
 * path: {siblings, leaf_key, leaf_value}}`` (leaf_key empty: the path ends in an empty
 * subtree). */
export function decodeCoinProof(data) {
  const r = new Reader(data, 'coin proof');
  readVersion(r);
  const coin_id = r.bytes(32);
  const checkpoint = readSignedCheckpoint(r);
  const entry = readEntryProof(r);
  const depth = r.u16();
  if (depth > KEY_BITS) throw malformed('coin proof: deeper than the key');
  const present = r.bytes((depth + 7) >> 3); // bit i (little-endian): sibling i is not empty
  const has = (i) => (present[i >> 3] >> (i & 7)) & 1;
  for (let i = depth; i < present.length * 8; i++) {
    if (has(i)) throw malformed("coin proof: bits set past the path's depth");
  }
  const siblings = Array.from({ length: depth }, (_, i) => (has(i) ? r.bytes(32) : EMPTY));
  const terminal = r.u8();
  if (terminal > 1) throw malformed('coin proof: unknown end of path');
  const leaf_key = terminal ? r.bytes(32) : NOTHING;
  const leaf_value = terminal ? r.bytes(r.u16()) : NOTHING;
  r.finish();
  return { coin_id, checkpoint, entry, path: { siblings, leaf_key, leaf_value } };
}

/** A coin tree's value: ``{state ('spent' or 'unspent'), value_msat, owner, txid,
 * height}``, the transaction and height that created it (unspent) or spent it. */
function decodeCoinLeaf(data) {
  const r = new Reader(data, 'coin leaf');
  const state = COIN_STATES[r.u8()];
  if (state === undefined) throw malformed('coin leaf: unknown state');
  const leaf = { state, value_msat: r.u64(), owner: r.bytes(32), txid: r.bytes(32), height: r.u64() };
  r.finish();
  return leaf;
}

/** The coin's state as of the proof's checkpoint (not older than ``notBelow``), in
 * ``shard`` (``[owner, worker]``: the shard that holds the coin's partition, which the
 * caller knows; a proof from another shard is refused, as there no such coin would say
 * nothing): ``{checkpoint (its height), owner, worker, leaf}``, leaf null where no such
 * coin exists. */
export function verifyCoin(pin, proof, coinId, shard, notBelow = 0n) {
  if (!equal(proof.coin_id, coinId)) {
    throw wrongSubject(`the proof is of coin ${bytesToHex(proof.coin_id)}, not ${bytesToHex(coinId)}`);
  }
  const checkpoint = verifyCheckpoint(pin, proof.checkpoint, notBelow);
  const entry = verifyEntryProof(proof.entry, checkpoint);
  if (entry.owner !== shard[0] || entry.worker !== shard[1]) {
    throw wrongSubject(`the proof is from shard ${entry.owner}/${entry.worker}, not ${shard[0]}/${shard[1]}`);
  }
  const path = proof.path;
  if (!equal(coinPathRoot(coinId, path), entry.coins)) {
    throw badCoinPath(
      `coin ${bytesToHex(coinId)} does not lead to shard ${entry.owner}/${entry.worker}'s coin root ` +
        `at checkpoint ${checkpoint.height}`,
    );
  }
  const verdict = { checkpoint: checkpoint.height, owner: entry.owner, worker: entry.worker, leaf: null };
  if (path.leaf_key.length && !equal(path.leaf_key, coinId)) {
    // another coin's leaf where this one's would be: no such coin, if it is on the path
    if (!sharesPrefix(path.leaf_key, coinId, path.siblings.length)) {
      throw badCoinPath('the leaf shown in place of the coin is not on its path');
    }
    return verdict;
  }
  if (path.leaf_key.length) verdict.leaf = decodeCoinLeaf(path.leaf_value);
  return verdict;
}
