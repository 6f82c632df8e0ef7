// The page's verifier against the Python one: the vectors tests/web/test_verify_js.py
// writes (its path in CST_VECTORS) say what Python's verifier answered for each proof,
// or the code of its refusal; verify.js must say the same.
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  Descriptor,
  Pin,
  ProofRefused,
  bytesToHex,
  decodeAnnounced,
  decodeCoinProof,
  decodeSignedCheckpoint,
  decodeTxProof,
  hexToBytes,
  membersRoot,
  verifyCheckpoint,
  verifyCoin,
  verifyTx,
} from '../src/verify.js';

const path = process.env.CST_VECTORS;
const doc = path ? JSON.parse(readFileSync(path, 'utf8')) : null;
const skip = doc ? false : 'CST_VECTORS is not set (tests/web/test_verify_js.py sets it)';
const pin = doc && new Pin(doc.pin.guild, hexToBytes(doc.pin.key), hexToBytes(doc.pin.members));

/** What the page's verifier says, as the vectors put it. */
function says(check) {
  try {
    return { ok: check() };
  } catch (e) {
    if (!(e instanceof ProofRefused)) throw e; // anything else is a bug of the verifier
    return { error: e.code };
  }
}

const expected = (v) => ('error' in v ? { error: v.error } : { ok: v.ok });
const plain = (x) => JSON.parse(JSON.stringify(x, (_, v) => (typeof v === 'bigint' ? Number(v) : v)));

test('the descriptor and the member set', { skip }, () => {
  const d = Descriptor.decode(doc.descriptor.text);
  assert.equal(d.pin.guild, doc.pin.guild);
  assert.equal(bytesToHex(d.pin.key), doc.pin.key);
  assert.equal(bytesToHex(d.pin.members), doc.pin.members);
  assert.equal(bytesToHex(d.first), doc.descriptor.first);
  for (const bad of doc.bad_descriptors) assert.equal(says(() => Descriptor.decode(bad)).error, 'malformed');
  const m = doc.members_root;
  assert.equal(bytesToHex(membersRoot(m.threshold, m.members.map(([n, k]) => [n, hexToBytes(k)]))), m.root);
});

test('checkpoints as the gateway serves them', { skip }, () => {
  for (const v of doc.announced) {
    const got = says(() => {
      const a = decodeAnnounced(hexToBytes(v.encoded));
      assert.equal(a.entries.length, v.entries);
      return verifyCheckpoint(pin, a.signed).height;
    });
    assert.deepEqual(got, expected(v), v.case);
  }
});

test('transaction proofs', { skip }, () => {
  for (const v of doc.tx) {
    const got = says(() => verifyTx(pin, decodeTxProof(hexToBytes(v.proof)), hexToBytes(v.txid)).map((p) => ({
      owner: p.owner,
      worker: p.worker,
      checkpoint: p.checkpoint,
      height: p.record.height,
      committed: p.record.committed,
      fee_msat: p.record.fee_msat,
      changes: p.record.changes.map((c) => [c.kind, bytesToHex(c.coin_id), bytesToHex(c.owner), c.value_msat, c.ledger ? bytesToHex(c.ledger) : '']),
    })));
    assert.deepEqual(plain(got), expected(v), v.case);
  }
});

test('coin proofs', { skip }, () => {
  for (const v of doc.coin) {
    const got = says(() => {
      const r = verifyCoin(pin, decodeCoinProof(hexToBytes(v.proof)), hexToBytes(v.coin_id), v.shard);
      const l = r.leaf;
      return { checkpoint: r.checkpoint, owner: r.owner, worker: r.worker, leaf: l && [l.state, l.value_msat, bytesToHex(l.owner), bytesToHex(l.txid), l.height] };
    });
    assert.deepEqual(plain(got), expected(v), v.case);
  }
});

test('handovers: the key above one is the one it names', { skip }, () => {
  const h = doc.handover;
  const followed = pin.follow(decodeSignedCheckpoint(hexToBytes(h.handover)));
  assert.equal(followed.handovers.length, 1);
  assert.equal(pin.handovers.length, 0); // a pin is not changed by what follows it
  const again = decodeSignedCheckpoint(hexToBytes(h.handover));
  assert.deepEqual(says(() => followed.follow(again).handovers.length), h['follow twice']);
  const noKey = decodeSignedCheckpoint(hexToBytes(h.no_key));
  assert.deepEqual(says(() => followed.follow(noKey).handovers.length), h['hands over to no key']);
  for (const v of h.checkpoints) {
    const got = says(() => verifyCheckpoint(followed, decodeSignedCheckpoint(hexToBytes(v.signed))).height);
    assert.deepEqual(got, expected(v), v.case);
  }
});
