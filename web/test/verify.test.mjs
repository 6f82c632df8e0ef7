// The page's verifier (src/verify.js) against the Python one, on the vectors that
// tests/web/test_verify_js.py writes (their path in CST_VECTORS): for each, what Python's
// verifier answered (``ok``, its answer as JSON) or the code of its refusal (``error``).
// verify.js must answer the same: the same decoded fields, or a ProofRefused of that code.
//
// Answers are compared as JSON written the same way on both sides: fields by their
// Python names, bytes as hex, integers as decimal strings (exact past 2**53).
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import {
  Descriptor,
  Pin,
  ProofRefused,
  blockState,
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
  verifyCheckpoint,
  verifyCoin,
  verifyTx,
} from '../src/verify.js';

const path = process.env.CST_VECTORS;
const skip = !path && 'CST_VECTORS is not set: tests/web/test_verify_js.py writes the vectors and sets it';
const doc = path ? JSON.parse(readFileSync(path, 'utf8')) : { pins: {}, vectors: [] };

/** An answer as the vectors write it. */
function plain(x) {
  if (x instanceof Uint8Array) return bytesToHex(x);
  if (typeof x === 'bigint' || typeof x === 'number') return String(x);
  if (Array.isArray(x)) return x.map(plain);
  if (x !== null && typeof x === 'object') {
    return Object.fromEntries(Object.entries(x).map(([k, v]) => [k, plain(v)]));
  }
  return x;
}

/** What the page's verifier says: its answer, or the code of its refusal (anything but a
 * ProofRefused is a bug of the verifier, and fails the test). */
function says(answer) {
  try {
    return { ok: plain(answer()) };
  } catch (e) {
    if (!(e instanceof ProofRefused)) throw e;
    return { error: e.code };
  }
}

/** The pins the vectors name: a guild's key and member set, and the handovers followed. */
const pins = Object.fromEntries(
  Object.entries(doc.pins).map(([name, p]) => {
    let pin = new Pin(p.guild, hexToBytes(p.key), hexToBytes(p.members));
    for (const h of p.handovers) pin = pin.follow(decodeSignedCheckpoint(hexToBytes(h)));
    return [name, pin];
  }),
);

/** How the page's verifier answers each kind of vector (the Python test answers each the
 * same way with the Python verifier). */
const ANSWER = {
  descriptor: (v) => Descriptor.decode(v.text),
  members_root: (v) => membersRoot(v.threshold, v.members.map(([name, key]) => [name, hexToBytes(key)])),
  block_state: (v) => blockState(hexToBytes(v.block), hexToBytes(v.root)),
  address: (v) => encodeAddress(hexToBytes(v.key), v.hrp),
  shard_of: (v) => shardOf(hexToBytes(v.coin_id), v.workers),
  checkpoint: (v) => {
    const signed = decodeSignedCheckpoint(hexToBytes(v.signed));
    const c = verifyCheckpoint(pins[v.pin], signed, BigInt(v.not_below));
    return { checkpoint: c, message: checkpointMessage(c) };
  },
  follow: (v) => {
    const pin = pins[v.pin].follow(decodeSignedCheckpoint(hexToBytes(v.signed)));
    return { pin, at: v.heights.map((h) => pin.at(BigInt(h))) };
  },
  announced: (v) => verifyAnnounced(pins[v.pin], decodeAnnounced(hexToBytes(v.encoded)), BigInt(v.not_below)),
  tx: (v) => verifyTx(pins[v.pin], decodeTxProof(hexToBytes(v.proof)), hexToBytes(v.txid)),
  coin: (v) => {
    const proof = decodeCoinProof(hexToBytes(v.proof));
    return verifyCoin(pins[v.pin], proof, hexToBytes(v.coin_id), v.shard, BigInt(v.not_below));
  },
};

for (const [kind, answer] of Object.entries(ANSWER)) {
  test(`${kind} vectors: the same answer, or a refusal with the same code`, { skip }, () => {
    const vectors = doc.vectors.filter((v) => v.kind === kind);
    assert.ok(vectors.length > 0, `no ${kind} vectors`);
    const differ = [];
    for (const v of vectors) {
      const want = 'error' in v ? { error: v.error } : { ok: v.ok };
      const got = says(() => answer(v));
      try {
        assert.deepEqual(got, want);
      } catch (e) {
        differ.push(`${v.case}: ${e.message}`);
      }
    }
    assert.deepEqual(differ.slice(0, 5), [], `${differ.length} of ${vectors.length} ${kind} vectors differ`);
  });
}

test('every kind of vector is checked here', { skip }, () => {
  assert.deepEqual([...new Set(doc.vectors.map((v) => v.kind))].sort(), Object.keys(ANSWER).sort());
});

test('u64 values are BigInts, exact past 2**53', { skip }, () => {
  const v = doc.vectors.find((x) => x.kind === 'tx' && x.case.startsWith('big') && 'ok' in x);
  assert.ok(v, 'a transaction of the ledger of big values');
  const placed = ANSWER.tx(v);
  const { record } = placed[0];
  for (const n of [placed[0].checkpoint, record.height, record.fee_msat, record.changes[0].value_msat]) {
    assert.equal(typeof n, 'bigint');
  }
  assert.ok(placed.some((p) => p.record.changes.some((c) => c.value_msat > 2n ** 53n)));
});
